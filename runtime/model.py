"""`load()` returns a ready model; `Model.chat()` takes the published message shape; `stream_generate()`
yields small response records (text piece, token, running timings), as mlx-lm does.

The prompt follows the model's own chat template (stored in the GGUF). Each image in a message becomes
`<image_id>N</image_id>` (families that use image ids) plus mtmd's image chunks (`<image>` + overview +
`</image>` + slices); image embeddings are cached by image digest, and the KV cache keeps the common
prefix between calls, so a follow-up turn re-encodes and re-decodes nothing of the history."""

from __future__ import annotations

import codecs
import ctypes
import os
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import jinja2.sandbox
import llama_cpp
import numpy as np
from PIL import Image

from .engine import Engine, EngineError, Sampling
from .clip_encoder import PieceEncoder
from .embedding_cache import EmbeddingCache
from .images import image_digest, load_image
from .info import describe_gguf
from .slicing import DEFAULT_MAX_SLICE_NUMS, cut, frame_for, layout_parts, plan_slices
from .vision import VisionTower

# A 1344x1344 page with 9 slices is ~700 positions; contexts grow (doubling) when a chat needs more.
DEFAULT_CONTEXT = 2048
THINK_START, THINK_END = "<think>", "</think>"
# Stands for an image while the chat template renders; no tokenizer or user text produces it.
IMAGE_SENTINEL = "\x00minicpmv-edge-image\x00"


@dataclass(frozen=True)
class GenerationResponse:
    text: str  # the new piece of text (may be empty while a multi-byte character is incomplete)
    token: int
    image_encode_ms: float
    prompt_tokens: int
    prefill_tokens_per_s: float
    generation_tokens: int
    decode_tokens_per_s: float
    peak_rss_mb: float
    finish_reason: str | None = None  # "stop", "length" on the last record


@dataclass
class ChatAnswer:
    """What `chat()` returns: the answer, and the reasoning separately when thinking was on."""

    text: str
    reasoning: str = ""
    timings: dict[str, float] = field(default_factory=dict)

    def __str__(self) -> str:
        return self.text


def split_reasoning(text: str) -> tuple[str, str]:
    """(reasoning, answer) of a thinking-mode output: what precedes </think> is the reasoning."""
    if THINK_END not in text:
        return "", text
    reasoning, answer = text.split(THINK_END, 1)
    return reasoning.replace(THINK_START, "").strip(), answer


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def find_pair(folder: Path) -> tuple[Path, Path]:
    """The language model and mmproj GGUF that `minicpmv convert` wrote into `folder`."""
    ggufs = sorted(folder.glob("*.gguf"))
    mmprojs = [p for p in ggufs if "mmproj" in p.name]
    models = [p for p in ggufs if "mmproj" not in p.name]
    if len(mmprojs) != 1 or len(models) != 1:
        raise EngineError(f"{folder} should hold one model GGUF and one mmproj GGUF; found "
                          f"{[p.name for p in ggufs] or 'none'}")
    return models[0], mmprojs[0]


class Model:
    def __init__(self, model_path: Path, mmproj_path: Path, *, n_ctx: int, n_threads: int, repack: bool):
        # Names the model in batch-job keys and records: a different file means different answers.
        self.identity = f"{model_path.name}:{model_path.stat().st_size}+{mmproj_path.name}:{mmproj_path.stat().st_size}"
        self.engine = Engine(model_path, n_ctx=n_ctx, n_threads=n_threads, repack=repack)
        self.vision = VisionTower(mmproj_path, self.engine.model, n_threads)
        projector = describe_gguf(mmproj_path)["metadata"]
        patch_size = int(projector.get("clip.vision.patch_size", 14))
        self.pieces = PieceEncoder(self.vision.context, self.engine.n_embd, n_threads,
                                   tuple(projector.get("clip.vision.image_mean", (0.5, 0.5, 0.5))),
                                   tuple(projector.get("clip.vision.image_std", (0.5, 0.5, 0.5))), patch_size)
        # MiniCPM-V 4.6's merger folds merge x merge patches into one token, so pieces align to that.
        merge = int(projector.get("clip.vision.projector.scale_factor", 1)) \
            if projector.get("clip.projector_type") == "minicpmv4_6" else 1
        self.piece_align = patch_size * merge
        self.family = self._meta("minicpmv_edge.family") or ""
        self.use_image_id = self._meta("minicpmv_edge.use_image_id") == "true"
        self.max_slice_nums = int(self._meta("minicpmv_edge.max_slice_nums") or DEFAULT_MAX_SLICE_NUMS)
        self.frame = frame_for(self.family)
        template = llama_cpp.llama_model_chat_template(self.engine.model, None)
        if not template:
            raise EngineError(f"{model_path} carries no chat template")
        env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        self.template = env.from_string(template.decode())
        bos = llama_cpp.llama_vocab_bos(self.engine.vocab)
        self.bos = self.engine.piece(bos, special=True).decode(errors="ignore")
        self._embeddings: dict[tuple[str, int, int], np.ndarray] = {}  # (digest, max_slice_nums, piece)
        self.disk_cache: EmbeddingCache | None = None  # set by batch jobs that rerun over the same images

    def _meta(self, key: str) -> str | None:
        buf = ctypes.create_string_buffer(256)
        n = llama_cpp.llama_model_meta_val_str(self.engine.model, key.encode(), buf, len(buf))
        return buf.value.decode() if n >= 0 else None

    def close(self) -> None:
        self.vision.close()
        self.engine.close()

    # ---- prompt -----------------------------------------------------------------------------------------

    def _render(self, msgs: Sequence[dict[str, Any]], system_prompt: str | None,
                enable_thinking: bool) -> tuple[list[str], list[Any]]:
        """The chat template applied; returns the text split around images, and the images in order.
        As the published chat() does, a message's parts are joined with newlines and each image stands
        where the user put it."""
        images: list[Any] = []
        messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
        for msg in msgs:
            role, content = msg.get("role"), msg.get("content")
            if role not in ("user", "assistant", "system"):
                raise ValueError(f"message role must be user, assistant or system, not {role!r}")
            parts = [content] if isinstance(content, str) else list(content or [])
            texts = []
            for part in parts:
                if isinstance(part, str):
                    texts.append(part)
                else:
                    images.append(load_image(part))
                    texts.append(IMAGE_SENTINEL)
            messages.append({"role": role, "content": "\n".join(texts)})
        text = self.template.render(messages=messages, add_generation_prompt=True, bos_token=self.bos,
                                    enable_thinking=enable_thinking)
        return text.split(IMAGE_SENTINEL), images

    def prepare(self, msgs: Sequence[dict[str, Any]], *, system_prompt: str | None = None,
                enable_thinking: bool = False, max_slice_nums: int | None = None,
                use_image_id: bool | None = None) -> tuple[list[object], float]:
        """Prompt items for the engine (token ids, and (piece key, row) for image embeddings) laid out as the
        family's official processor does, and the time spent encoding new pieces in ms."""
        texts, images = self._render(msgs, system_prompt, enable_thinking)
        slices = self.max_slice_nums if max_slice_nums is None else int(max_slice_nums)
        if slices < 1:
            raise ValueError("max_slice_nums must be at least 1")
        with_ids = self.use_image_id if use_image_id is None else use_image_id
        encode_s = 0.0
        items: list[object] = []
        for index, text in enumerate(texts):
            items.extend(self.engine.tokenize(text))
            if index == len(images):
                break
            image = images[index]
            layout = plan_slices(image.size, slices, self.piece_align)
            digest = image_digest(image)
            pieces: list[Image.Image] | None = None
            for part in layout_parts(layout, self.frame, index if with_ids else None):
                if isinstance(part, str):
                    items.extend(self.engine.tokenize(part))
                    continue
                key = (digest, slices, part)
                if key not in self._embeddings and self.disk_cache is not None:
                    cached = self.disk_cache.get(key)
                    if cached is not None:
                        self._embeddings[key] = cached
                if key not in self._embeddings:
                    pieces = pieces or cut(image, layout)
                    started = time.perf_counter()
                    self._embeddings[key] = self.pieces.encode(pieces[part])
                    encode_s += time.perf_counter() - started
                    if self.disk_cache is not None:
                        self.disk_cache.put(key, self._embeddings[key])
                items.extend((key, row) for row in range(self._embeddings[key].shape[0]))
        return items, encode_s * 1000

    # ---- generation -------------------------------------------------------------------------------------

    def stream_generate(self, msgs: Sequence[dict[str, Any]], *, max_new_tokens: int = 512,
                        sampling: Sampling = Sampling(), system_prompt: str | None = None,
                        enable_thinking: bool = False, max_slice_nums: int | None = None,
                        use_image_id: bool | None = None) -> Iterator[GenerationResponse]:
        items, encode_ms = self.prepare(msgs, system_prompt=system_prompt, enable_thinking=enable_thinking,
                                        max_slice_nums=max_slice_nums, use_image_id=use_image_id)
        self.engine.reserve(len(items) + max_new_tokens)
        started = time.perf_counter()
        decoded = self.engine.feed(items, self._embeddings)
        prefill_s = time.perf_counter() - started
        prefill_tps = decoded / prefill_s if prefill_s > 0 else 0.0
        chain = self.engine.sampler(sampling)
        utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        decode_started = time.perf_counter()
        try:
            for n in range(1, max_new_tokens + 1):
                token = self.engine.sample(chain)
                end = self.engine.is_end(token)
                text = "" if end else utf8.decode(self.engine.piece(token))
                elapsed = time.perf_counter() - decode_started
                finish = "stop" if end else ("length" if n == max_new_tokens else None)
                yield GenerationResponse(text, token, encode_ms, len(items), prefill_tps, n,
                                         n / elapsed if elapsed > 0 else 0.0, _peak_rss_mb(), finish)
                if finish:
                    break
                self.engine.append_token(token)
        finally:
            llama_cpp.llama_sampler_free(chain)

    def chat(self, msgs: Sequence[dict[str, Any]], *, stream: bool = False, enable_thinking: bool = False,
             max_new_tokens: int = 512, temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
             repetition_penalty: float = 1.0, seed: int = 0, max_slice_nums: int | None = None,
             use_image_id: bool | None = None, system_prompt: str | None = None) -> ChatAnswer | Iterator[str]:
        """The published `chat()` call shape. Returns the answer (reasoning separated), or with
        `stream=True` an iterator of text pieces."""
        records = self.stream_generate(
            msgs, max_new_tokens=max_new_tokens, enable_thinking=enable_thinking, use_image_id=use_image_id,
            max_slice_nums=max_slice_nums,
            sampling=Sampling(temperature, top_p, top_k, repetition_penalty, seed), system_prompt=system_prompt)
        if stream:
            return (record.text for record in records)
        pieces, last = [], None
        for record in records:
            pieces.append(record.text)
            last = record
        reasoning, text = split_reasoning("".join(pieces))
        timings = {} if last is None else {
            "image_encode_ms": last.image_encode_ms, "prompt_tokens": last.prompt_tokens,
            "prefill_tokens_per_s": last.prefill_tokens_per_s, "generation_tokens": last.generation_tokens,
            "decode_tokens_per_s": last.decode_tokens_per_s, "peak_rss_mb": last.peak_rss_mb}
        return ChatAnswer(text.strip(), reasoning, timings)


def load(model: str | Path, mmproj: str | Path | None = None, *, n_ctx: int = DEFAULT_CONTEXT,
         n_threads: int | None = None, repack: bool = False) -> Model:
    """Load a converted pair: the folder `minicpmv convert` wrote, or the two GGUF files."""
    model_path = Path(model).expanduser()
    if mmproj is None:
        if not model_path.is_dir():
            raise EngineError(f"{model_path} is not a folder; give the model GGUF and the mmproj GGUF")
        model_path, mmproj_path = find_pair(model_path)
    else:
        mmproj_path = Path(mmproj).expanduser()
    for path in (model_path, mmproj_path):
        if not path.is_file():
            raise EngineError(f"no such file: {path}")
    return Model(model_path, mmproj_path, n_ctx=n_ctx, n_threads=n_threads or len(os.sched_getaffinity(0)), repack=repack)
