"""`load()` returns a ready model; `Model.chat()` is the published `chat()`; `stream_generate()` yields
small response records (text piece, token, running timings), as mlx-lm does.

A Model composes three parts: the prompt builder (`prompt.py`: chat template + the family's layout ->
prompt items), the vision pipeline (`vision_pipeline.py`: pieces -> embeddings, cached) and the engine
(`engine.py`: llama.cpp's decoder, whose KV cache keeps the common prefix between calls, so a follow-up
turn re-encodes and re-decodes nothing of the history)."""

from __future__ import annotations

import codecs
import ctypes
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import llama_cpp
import numpy as np

from minicpmv_edge.common.system import default_threads, peak_rss_mb

from .canvas_rope import CanvasModel, CanvasPlan
from .embedding_cache import DEFAULT_MEMORY_BYTES, EmbeddingCache, EmbeddingMemory
from .engine import Engine, EngineError, PositionPlan, Sampling, SequenceSlot
from .pair import PromptSettings, prompt_settings, read_metadata, resolve_pair
from .prompt import ChatInputError, PromptBuilder, PromptItem
from .vision_pipeline import VisionPipeline

# A 1344x1344 page with 9 slices is ~700 positions; contexts grow (doubling) when a chat needs more.
DEFAULT_CONTEXT = 2048
THINK_START, THINK_END = "<think>", "</think>"


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


class Generation:
    """One answer being generated from a sequence whose prompt is decoded: its own sampler chain, the text
    decoding of its tokens and the running figures its records carry (shared by `stream_generate` and the
    multi-sequence scheduler). `sampling.ignore_eos` generates `max_new_tokens` whatever the model says."""

    def __init__(self, engine: Engine, sampling: Sampling, max_new_tokens: int, prompt_tokens: int,
                 encode_ms: float, prefill_tokens_per_s: float):
        self.engine, self.max_new_tokens, self.prompt_tokens = engine, max_new_tokens, prompt_tokens
        self.encode_ms, self.prefill_tokens_per_s = encode_ms, prefill_tokens_per_s
        self.chain = engine.sampler(sampling)
        self.utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.tokens = 0
        self.started = time.perf_counter()

    def next_record(self, sequence: SequenceSlot) -> GenerationResponse:
        """Sample the sequence's next token (its logits are the last decoded batch's) and describe it."""
        token = self.engine.sample(self.chain, sequence.seq_id)
        self.tokens += 1
        end = self.engine.is_end(token)
        text = "" if end else self.utf8.decode(self.engine.piece(token))
        elapsed = time.perf_counter() - self.started
        finish = "stop" if end else ("length" if self.tokens == self.max_new_tokens else None)
        return GenerationResponse(text, token, self.encode_ms, self.prompt_tokens, self.prefill_tokens_per_s,
                                  self.tokens, self.tokens / elapsed if elapsed > 0 else 0.0, peak_rss_mb(), finish)

    def close(self) -> None:
        if self.chain is not None:
            llama_cpp.llama_sampler_free(self.chain)
            self.chain = None


class ChatAnswer(str):
    """What `chat()` returns: the answer as a `str` (so the published multi-turn code can append it to the
    history), with the reasoning of thinking mode and the timings alongside."""

    reasoning: str
    timings: dict[str, float]

    def __new__(cls, text: str, reasoning: str = "", timings: dict[str, float] | None = None) -> "ChatAnswer":
        answer = super().__new__(cls, text)
        answer.reasoning, answer.timings = reasoning, dict(timings or {})
        return answer

    @property
    def text(self) -> str:
        return str(self)

    @classmethod
    def of(cls, records: Iterable[GenerationResponse]) -> "ChatAnswer":
        """The answer a stream of records makes (reasoning split off, timings from the last record)."""
        pieces, last = [], None
        for record in records:
            pieces.append(record.text)
            last = record
        reasoning, text = split_reasoning("".join(pieces))
        timings = {} if last is None else {
            "image_encode_ms": last.image_encode_ms, "prompt_tokens": last.prompt_tokens,
            "prefill_tokens_per_s": last.prefill_tokens_per_s, "generation_tokens": last.generation_tokens,
            "decode_tokens_per_s": last.decode_tokens_per_s, "peak_rss_mb": last.peak_rss_mb}
        return cls(text.strip(), reasoning, timings)


def split_reasoning(text: str) -> tuple[str, str]:
    """(reasoning, answer) of a thinking-mode output: what precedes </think> is the reasoning."""
    if THINK_END not in text:
        return "", text
    reasoning, answer = text.split(THINK_END, 1)
    return reasoning.replace(THINK_START, "").strip(), answer


# The published chat()'s generation settings: sampling=True samples with these (the keyword arguments of
# the same names override them); sampling=False runs a 3-beam search there, greedy decoding here.
PUBLISHED_SAMPLING = {"temperature": 0.7, "top_p": 0.8, "top_k": 100, "repetition_penalty": 1.05}
GENERATION_KEYWORDS = {*PUBLISHED_SAMPLING, "do_sample", "num_beams"}


def _is_messages(value: Any) -> bool:
    return isinstance(value, str) or (isinstance(value, list) and bool(value) and isinstance(value[0], (dict, list)))


class Model:
    """A loaded pair: the decoder (`engine`), the vision pipeline (`vision`: tower, encoder, caches) and the
    prompt builder (`prompt`: the chat template and the family's layout). A context manager; `close()`
    frees llama.cpp's memory."""

    def __init__(self, model_path: Path, mmproj_path: Path, *, n_ctx: int, n_threads: int, repack: bool,
                 embedding_memory_bytes: int = DEFAULT_MEMORY_BYTES):
        self.engine: Engine | None = None
        self.vision: VisionPipeline | None = None
        self._canvas: CanvasModel | None = None  # what canvas M-RoPE families' positions need
        # Names the model in batch-job keys and records: a different file means different answers.
        self.identity = f"{model_path.name}:{model_path.stat().st_size}+{mmproj_path.name}:{mmproj_path.stat().st_size}"
        try:
            projector = read_metadata(mmproj_path)
            self.engine = Engine(model_path, n_ctx=n_ctx, n_threads=n_threads, repack=repack)
            settings = prompt_settings(self._meta, projector)
            if settings.family.positions == "canvas":
                self._canvas = CanvasModel(settings.family, model_path)
            template = llama_cpp.llama_model_chat_template(self.engine.model, None)
            if not template:
                raise EngineError(f"{model_path} carries no chat template (tokenizer.chat_template)")
            bos = self.engine.piece(llama_cpp.llama_vocab_bos(self.engine.vocab), special=True).decode(errors="ignore")
            self.prompt = PromptBuilder(template.decode(), bos, settings, self.engine.tokenize)
            self.vision = VisionPipeline(mmproj_path, projector, self.engine.model, self.engine.n_embd, n_threads,
                                         embedding_memory_bytes)
        except BaseException:
            self.close()
            raise

    @property
    def settings(self) -> PromptSettings:
        return self.prompt.settings

    @property
    def family(self) -> str:
        return self.settings.family.key

    @property
    def max_slice_nums(self) -> int:
        return self.settings.max_slice_nums

    @property
    def embeddings(self) -> EmbeddingMemory:
        return self.vision.memory

    @property
    def disk_cache(self) -> EmbeddingCache | None:
        return self.vision.disk_cache

    @disk_cache.setter
    def disk_cache(self, cache: EmbeddingCache | None) -> None:
        self.vision.disk_cache = cache

    def _meta(self, key: str) -> str | None:
        buf = ctypes.create_string_buffer(256)
        n = llama_cpp.llama_model_meta_val_str(self.engine.model, key.encode(), buf, len(buf))
        return buf.value.decode() if n >= 0 else None

    def close(self) -> None:
        if self.vision is not None:
            self.vision.close()
        if self.engine is not None:
            self.engine.close()

    def __enter__(self) -> "Model":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def reset(self) -> None:
        """Forget the conversation held in the KV cache (the next prompt is decoded from the start)."""
        self.engine.feed([], self.embeddings)

    def prompt_logits(self, items: Sequence[PromptItem]) -> np.ndarray:
        """[len(items), n_vocab] logits at every position of `items` (from `prepare`), decoded from an empty
        cache: what parity checks and scoring need."""
        self.reset()
        logits = np.empty((len(items), llama_cpp.llama_vocab_n_tokens(self.engine.vocab)), dtype=np.float32)

        def keep(start: int, rows: np.ndarray) -> None:
            logits[start:start + len(rows)] = rows

        self.engine.feed(list(items), self.embeddings, on_logits=keep, plan=self.position_plan(items))
        return logits

    def prepare(self, msgs: Sequence[dict[str, Any]], *, system_prompt: str | None = None,
                enable_thinking: bool = False, max_slice_nums: int | None = None,
                use_image_id: bool | None = None, small_image_upsize: str | None = None,
                temporal_ids: Sequence[Sequence[int]] | None = None) -> tuple[list[PromptItem], float]:
        """The prompt items of `msgs` (token ids, and (piece key, row) for image embeddings) laid out as the
        family's official processor does, and the time spent encoding new pieces in ms. `small_image_upsize`
        (MiniCPM-OCR: "always", "never" or "adaptive", which needs OpenCV) overrides the checkpoint's preprocessor
        setting; `temporal_ids` (3D-resampler families) group the images into video blocks, as published."""
        items, seconds = self.prompt.build(msgs, self.vision, system_prompt=system_prompt,
                                           enable_thinking=enable_thinking, max_slice_nums=max_slice_nums,
                                           use_image_id=use_image_id, small_image_upsize=small_image_upsize,
                                           temporal_ids=temporal_ids)
        return items, seconds * 1000

    # ---- generation -------------------------------------------------------------------------------------

    def stream_generate(self, msgs: Sequence[dict[str, Any]], *, max_new_tokens: int = 512,
                        sampling: Sampling = Sampling(), system_prompt: str | None = None,
                        enable_thinking: bool = False, max_slice_nums: int | None = None,
                        use_image_id: bool | None = None, small_image_upsize: str | None = None,
                        temporal_ids: Sequence[Sequence[int]] | None = None) -> Iterator[GenerationResponse]:
        items, encode_ms = self.prepare(msgs, system_prompt=system_prompt, enable_thinking=enable_thinking,
                                        max_slice_nums=max_slice_nums, use_image_id=use_image_id,
                                        small_image_upsize=small_image_upsize, temporal_ids=temporal_ids)
        self.engine.reserve(len(items) + max_new_tokens)
        started = time.perf_counter()
        decoded = self.engine.feed(items, self.embeddings, plan=self.position_plan(items))
        answer = Generation(self.engine, sampling, max_new_tokens, len(items), encode_ms,
                            decoded / max(time.perf_counter() - started, 1e-9))
        try:
            while True:
                record = answer.next_record(self.engine.slots[0])
                yield record
                if record.finish_reason:
                    break
                self.engine.append_token(record.token)
        finally:
            answer.close()

    def position_plan(self, items: Sequence[PromptItem]) -> PositionPlan | None:
        """Explicit positions for the prompt's items where the family's decoder needs them: MiniCPM-V 4.7's
        canvas M-RoPE (runtime/canvas_rope.py); None for sequential positions. Call it right after `prepare`,
        whose pieces' sizes it reads."""
        if self._canvas is None:
            return None
        align = self.vision.piece_align
        sizes = self.prompt.piece_sizes
        grids = {key: (sizes[key][1] // align, sizes[key][0] // align)
                 for key in {item[0] for item in items if not isinstance(item, int)}}
        return CanvasPlan(self._canvas.markers, self._canvas.token_rows, grids.__getitem__)

    def chat(self, msgs: Any = None, image: Any = None, tokenizer: Any = None, processor: Any = None, *,
             vision_hidden_states: Any = None, max_new_tokens: int = 2048, min_new_tokens: int = 0,
             sampling: bool = True, max_inp_length: int | None = None, system_prompt: str = "",
             stream: bool = False, max_slice_nums: int | None = None, use_image_id: bool | None = None,
             temporal_ids: Any = None, enable_thinking: bool = False, seed: int = 0,
             small_image_upsize: str | None = None,
             **generation: Any) -> ChatAnswer | list[ChatAnswer] | Iterator[str]:
        """The published `chat()`: the same arguments, the same answer types. Returns the answer as a `str`
        (`ChatAnswer`, with `.reasoning` and `.timings`), a list of them for a batch of conversations, or with
        `stream=True` an iterator of text pieces.

        `tokenizer`, `processor` and `max_inp_length` are accepted and unused: the GGUF carries the tokenizer
        and the chat template, and the context bounds the prompt. `small_image_upsize` (MiniCPM-OCR's processor
        option: always, never, adaptive) overrides the checkpoint's setting. `sampling=True` (the published default)
        samples with the published settings, which `temperature`, `top_p`, `top_k` and `repetition_penalty`
        override; `sampling=False` decodes greedily (the published code runs a 3-beam search)."""
        if not _is_messages(msgs) and _is_messages(image):  # the published positional order is (image, msgs)
            msgs, image = image, msgs
        if isinstance(msgs, str):
            try:
                msgs = json.loads(msgs)
            except json.JSONDecodeError as e:
                raise ChatInputError(f"msgs is a string but not JSON: {e}") from None
        unknown = sorted(set(generation) - GENERATION_KEYWORDS)
        if unknown:
            raise ChatInputError(f"chat() does not take {', '.join(unknown)}")
        if vision_hidden_states is not None:
            raise ChatInputError("chat(): vision_hidden_states is not supported by this runtime yet")
        if min_new_tokens:
            raise ChatInputError("chat(): min_new_tokens is not supported by this runtime yet")
        if not msgs:
            raise ChatInputError("msgs is empty: give at least one user message")
        if isinstance(msgs[0], list):
            if image is not None or stream or temporal_ids is not None:
                raise ChatInputError("a batch of conversations takes its images inside msgs, cannot stream and "
                                     "takes no temporal_ids")
            return [self.chat(one, max_new_tokens=max_new_tokens, sampling=sampling, system_prompt=system_prompt,
                              max_slice_nums=max_slice_nums, use_image_id=use_image_id,
                              enable_thinking=enable_thinking, seed=seed,
                              small_image_upsize=small_image_upsize, **generation) for one in msgs]
        msgs = [dict(message) if isinstance(message, dict) else message for message in msgs]
        if image is not None and isinstance(msgs[0], dict) and isinstance(msgs[0].get("content"), str):
            msgs[0]["content"] = [image, msgs[0]["content"]]
        if sampling:
            settings = {**PUBLISHED_SAMPLING, **{k: v for k, v in generation.items() if k in PUBLISHED_SAMPLING}}
            chosen = Sampling(float(settings["temperature"]), float(settings["top_p"]), int(settings["top_k"]),
                              float(settings["repetition_penalty"]), seed)
        else:
            chosen = Sampling(0.0, repetition_penalty=float(generation.get("repetition_penalty", 1.0)), seed=seed)
        records = self.stream_generate(msgs, max_new_tokens=max_new_tokens, sampling=chosen,
                                       system_prompt=system_prompt or None, enable_thinking=enable_thinking,
                                       max_slice_nums=max_slice_nums, use_image_id=use_image_id,
                                       small_image_upsize=small_image_upsize, temporal_ids=temporal_ids)
        if stream:
            return (record.text for record in records)
        return ChatAnswer.of(records)


def load(model: str | Path, mmproj: str | Path | None = None, *, n_ctx: int = DEFAULT_CONTEXT,
         n_threads: int | None = None, repack: bool = False,
         embedding_memory_bytes: int = DEFAULT_MEMORY_BYTES) -> Model:
    """Load a GGUF pair: the folder `minicpmv convert` wrote (or any folder holding one model GGUF and one
    mmproj GGUF), a GGUF repo on the hub as `owner/name[:QUANT]` (fetched into the HF cache once), or the
    two files. `embedding_memory_bytes` bounds the image embeddings kept in memory beyond the current
    conversation's."""
    model_path, mmproj_path = resolve_pair(model, mmproj)
    return Model(model_path, mmproj_path, n_ctx=n_ctx, n_threads=n_threads or default_threads(),
                 repack=repack, embedding_memory_bytes=embedding_memory_bytes)
