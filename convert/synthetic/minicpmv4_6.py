"""MiniCPM-V 4.6 / 4.6-Thinking ("merger" families): random-weight checkpoints made by transformers.

Unlike the resampler families (one generic writer over `families.SPECS`), these folders are built
with transformers' own `MiniCPMV4_6ForConditionalGeneration` + `save_pretrained`, so tensor names,
shapes and the config layout are exactly what the published checkpoints (saved by transformers
5.7) carry. torch / transformers are imported lazily, inside `write_into` only: the package is
imported by a runtime that must not import torch.

What is published and what is assumed: PUBLISHED.md beside this file ("MiniCPM-V 4.6").
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any


from .families import QWEN3_BASE, QWEN3_THINKING_TEMPLATE
from .files import render, write_json
from .tokenizer import TokenizerFiles, _append_added, _dumps, train_bytelevel

MERGER_FAMILIES: tuple[str, ...] = ("minicpm-v-4.6", "minicpm-v-4.6-thinking")

# Qwen3.5 pre-tokenizer split (llama.cpp: `qwen35`); differs from Qwen2's by the \p{M} classes.
QWEN35_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}"
                r"| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

MINICPM_IMAGE_TOKENS = ("<image>", "</image>", "<slice>", "</slice>", "<image_id>", "</image_id>")
# Appended after the trained vocabulary, in id order: Qwen3 specials (so <|image_pad|> sits 12
# after <|endoftext|>, as 248056 = 248044 + 12 in the published vocab), MiniCPM-V image tags, <unk>.
ADDED_TOKENS: tuple[tuple[str, bool], ...] = (
    QWEN3_BASE + tuple((t, True) for t in MINICPM_IMAGE_TOKENS) + (("<unk>", True),))

# Named tokens `MiniCPMV4_6Processor.__init__` reads from the tokenizer (tokenizer_config extra_special_tokens).
NAMED_TOKENS: dict[str, str] = {
    "image_token": "<|image_pad|>", "video_token": "<|video_pad|>",
    "image_start_token": "<image>", "image_end_token": "</image>",
    "slice_start_token": "<slice>", "slice_end_token": "</slice>",
    "image_id_start_token": "<image_id>", "image_id_end_token": "</image_id>",
}

_QWEN3_GEN_PROMPT = """{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\\n\\n</think>\\n\\n' }}
    {%- endif %}
    {%- if enable_thinking is defined and enable_thinking is true %}
        {{- '<think>\\n' }}
    {%- endif %}
{%- endif %}"""
_THINKING_GEN_PROMPT = """{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\\n\\n</think>\\n\\n' }}
    {%- else %}
        {{- '<think>\\n' }}
    {%- endif %}
{%- endif %}"""
if not QWEN3_THINKING_TEMPLATE.endswith(_QWEN3_GEN_PROMPT):   # pragma: no cover - guards families.py edits
    raise AssertionError("QWEN3_THINKING_TEMPLATE's generation-prompt block changed; update minicpmv4_6.py")
# 4.6-Thinking (assumed, PUBLISHED.md): opens a <think> block unless enable_thinking is false.
QWEN3_THINKING_ON_TEMPLATE = QWEN3_THINKING_TEMPLATE[: -len(_QWEN3_GEN_PROMPT)] + _THINKING_GEN_PROMPT


@dataclass(frozen=True)
class MergerFamily:
    key: str
    chat_template: str
    generation_config: dict[str, Any]   # "$id:<token>" -> id in the synthetic vocab


_SAMPLING = {"do_sample": True, "temperature": 0.6, "top_k": 20, "top_p": 0.95}
_IDS = {"bos_token_id": "$id:<|endoftext|>", "eos_token_id": ["$id:<|im_end|>", "$id:<|endoftext|>"],
        "pad_token_id": "$id:<|endoftext|>"}
MERGER_SPECS: dict[str, MergerFamily] = {f.key: f for f in (
    MergerFamily("minicpm-v-4.6", QWEN3_THINKING_TEMPLATE,
                 {**_IDS, **_SAMPLING, "chat_template_kwargs": {"enable_thinking": False}}),
    MergerFamily("minicpm-v-4.6-thinking", QWEN3_THINKING_ON_TEMPLATE, {**_IDS, **_SAMPLING}),
)}

# Published dims (vocab = published vocab_size) and the tiny ones the tests use.
FULL: dict[str, int] = dict(
    vocab=248094, hidden=1024, intermediate=3584, layers=24, heads=8, kv_heads=2, head_dim=256,
    lin_k_dim=128, lin_v_dim=128, lin_k_heads=16, lin_v_heads=16,
    v_hidden=1152, v_intermediate=4304, v_layers=27, v_heads=16, insert_layer_id=6,
)
TINY: dict[str, int] = dict(
    hidden=64, intermediate=128, layers=4, heads=4, kv_heads=2, head_dim=16,
    # linear_num_key_heads != linear_num_value_heads on purpose: exercises the V-head reordering path.
    lin_k_dim=16, lin_v_dim=16, lin_k_heads=2, lin_v_heads=4,
    # image_size stays 980 (70x70 position grid llama.cpp buckets on); insert_layer_id < v_layers.
    v_hidden=64, v_intermediate=128, v_layers=3, v_heads=2, insert_layer_id=1,
)
VOCAB_PAD = 64
FULL_ATTENTION_INTERVAL = 4

IMAGE_PROCESSOR: dict[str, Any] = {
    "do_convert_rgb": True, "do_normalize": True, "do_rescale": True, "do_resize": True,
    "downsample_mode": "16x", "image_mean": [0.5, 0.5, 0.5], "image_processor_type": "MiniCPMV4_6ImageProcessor",
    "image_std": [0.5, 0.5, 0.5], "max_slice_nums": 9, "patch_size": 14, "resample": 3,
    "rescale_factor": 0.00392156862745098, "scale_resolution": 448, "slice_mode": True, "use_image_id": True,
}
VIDEO_PROCESSOR: dict[str, Any] = {
    "do_convert_rgb": True, "do_normalize": True, "do_rescale": True, "do_resize": True,
    "do_sample_frames": True, "downsample_mode": "16x", "image_mean": [0.5, 0.5, 0.5],
    "image_std": [0.5, 0.5, 0.5], "max_num_frames": 128, "max_slice_nums": 9, "patch_size": 14,
    "resample": 3, "rescale_factor": 0.00392156862745098, "scale_resolution": 448, "slice_mode": True,
    "stack_frames": 1, "use_image_id": True, "video_processor_type": "MiniCPMV4_6VideoProcessor",
}


def get_merger_family(key: str) -> MergerFamily:
    try:
        return MERGER_SPECS[key]
    except KeyError:
        raise ValueError(f"unknown MiniCPM-V 4.6 family {key!r}; known: {', '.join(MERGER_FAMILIES)}") from None


# --- tokenizer ---------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def build_tokenizer_46() -> TokenizerFiles:
    """Tiny Qwen3.5-style byte-level BPE (qwen35 split), shared by both 4.6 families; cached."""
    tok = train_bytelevel(QWEN35_SPLIT)
    _append_added(tok, ADDED_TOKENS)
    vocab = tok.get_vocab(with_added_tokens=True)

    config = {
        "add_prefix_space": False, "backend": "tokenizers", "bos_token": None,
        "clean_up_tokenization_spaces": False, "eos_token": "<|im_end|>", "errors": "replace",
        "extra_special_tokens": dict(NAMED_TOKENS), "model_max_length": 262144,
        "pad_token": "<|endoftext|>", "split_special_tokens": False, "tokenizer_class": "TokenizersBackend",
        "unk_token": "<unk>",
    }
    files = {"tokenizer.json": _dumps(json.loads(tok.to_str())), "tokenizer_config.json": _dumps(config)}
    return TokenizerFiles(files=files, vocab=vocab, size=len(vocab))


# --- config ------------------------------------------------------------------------------------

def dims_46(size: str) -> dict[str, int]:
    if size == "tiny":
        return {**TINY, "vocab": -(-build_tokenizer_46().size // VOCAB_PAD) * VOCAB_PAD}
    if size == "full":
        return dict(FULL)
    raise ValueError(f"size must be 'tiny' or 'full', not {size!r}")


def config_kwargs(size: str) -> dict[str, Any]:
    """Keyword arguments of `MiniCPMV4_6Config` in the published layout (top level, text, vision)."""
    d = dims_46(size)
    vocab = build_tokenizer_46().vocab
    layer_types = ["linear_attention" if (i + 1) % FULL_ATTENTION_INTERVAL else "full_attention"
                   for i in range(d["layers"])]
    text = {
        "model_type": "qwen3_5_text", "attention_bias": False, "attn_output_gate": True,
        "full_attention_interval": FULL_ATTENTION_INTERVAL, "head_dim": d["head_dim"], "hidden_size": d["hidden"],
        "intermediate_size": d["intermediate"], "layer_types": layer_types, "linear_conv_kernel_dim": 4,
        "linear_key_head_dim": d["lin_k_dim"], "linear_num_key_heads": d["lin_k_heads"],
        "linear_num_value_heads": d["lin_v_heads"], "linear_value_head_dim": d["lin_v_dim"],
        "max_position_embeddings": 262144, "mtp_num_hidden_layers": 1, "mtp_use_dedicated_embeddings": False,
        "num_attention_heads": d["heads"], "num_hidden_layers": d["layers"], "num_key_value_heads": d["kv_heads"],
        "rms_norm_eps": 1e-06,
        "rope_parameters": {"partial_rotary_factor": 0.25, "rope_theta": 10000000, "rope_type": "default"},
        "tie_word_embeddings": True, "vocab_size": d["vocab"],
    }
    vision = {
        "model_type": "minicpmv4_6_vision", "hidden_size": d["v_hidden"], "intermediate_size": d["v_intermediate"],
        "num_hidden_layers": d["v_layers"], "num_attention_heads": d["v_heads"], "patch_size": 14,
        "image_size": 980, "insert_layer_id": d["insert_layer_id"],
    }
    return {
        "architectures": ["MiniCPMV4_6ForConditionalGeneration"], "text_config": text, "vision_config": vision,
        "insert_layer_id": d["insert_layer_id"], "image_token_id": vocab[NAMED_TOKENS["image_token"]],
        "video_token_id": vocab[NAMED_TOKENS["video_token"]], "tie_word_embeddings": True,
    }


def _import_transformers() -> tuple[Any, Any, Any]:
    try:
        import torch
        from transformers import MiniCPMV4_6Config, MiniCPMV4_6ForConditionalGeneration
    except ImportError as exc:
        raise RuntimeError(
            "MiniCPM-V 4.6 synthetic checkpoints are built with transformers' MiniCPMV4_6ForConditionalGeneration "
            f"(transformers >= 5.7) and torch ({exc}); install them with: pip install -e '.[test]'") from exc
    return torch, MiniCPMV4_6Config, MiniCPMV4_6ForConditionalGeneration


def write_into(folder: Path, family: str, size: str, seed: int) -> None:
    """Write the whole checkpoint into the (empty, temporary) `folder`."""
    fam = get_merger_family(family)
    kwargs = config_kwargs(size)            # validates size before the heavy imports
    torch, config_cls, model_cls = _import_transformers()
    tok = build_tokenizer_46()

    config = config_cls(**kwargs)
    torch.manual_seed(seed)
    model = model_cls(config)
    model.to(torch.bfloat16)
    model.eval()
    model.save_pretrained(folder, max_shard_size="5GB")
    del model

    # generation_config.json: save_pretrained wrote one from the model config; replace it with the
    # published-style file (ids from the synthetic vocab), keeping the writer's transformers_version.
    gen_path = folder / "generation_config.json"
    version = json.loads(gen_path.read_text()).get("transformers_version") if gen_path.exists() else None
    gen = render(fam.generation_config, {}, tok.vocab)
    if version:
        gen["transformers_version"] = version
    write_json(gen_path, gen)

    for name, content in tok.files.items():
        (folder / name).write_bytes(content)
    (folder / "chat_template.jinja").write_text(fam.chat_template, encoding="utf-8")
    write_json(folder / "preprocessor_config.json", {**IMAGE_PROCESSOR, "processor_class": "MiniCPMV4_6Processor"})
    write_json(folder / "processor_config.json", {"image_processor": dict(IMAGE_PROCESSOR),
                                              "processor_class": "MiniCPMV4_6Processor",
                                              "video_processor": dict(VIDEO_PROCESSOR)})
