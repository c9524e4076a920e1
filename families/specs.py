"""The pure-data parts of a `Family` that only the synthetic checkpoint factory and the tests read: what a
random-weight checkpoint of the family looks like (`CheckpointSpec`, read by `minicpmv_edge.synthetic`) and
which independent torch reference the tests build for it (`ReferenceHints`, read by tests/reference.py).
Plain values only: nothing here imports torch, transformers or the factory.

Placeholders in the `config` / `generation_config` templates: ``"$name"`` is a size-dependent number
(`full` for size "full", `tiny` for "tiny"), ``"$id:<token>"`` that token's id in the synthetic tokenizer (ids
differ from the published ones because the vocabulary is tiny; the *structure* is kept). Sources and
confidence of every value: PUBLISHED.md beside this file.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

Tokens = tuple[tuple[str, bool], ...]  # (content, special), in id order


@dataclass(frozen=True)
class CheckpointSpec:
    """A family's published Hugging Face checkpoint, as the synthetic factory writes it (sizes shrink for tiny)."""

    # The factory's writer for this layout (minicpmv_edge.synthetic maps the name to its code): "resampler"
    # (one generic writer of `llm.` / `vpm.` / `resampler.` tensors) or "minicpmv4_6" (transformers' own class,
    # the one `config["architectures"]` names, + save_pretrained: MiniCPM-V 4.6, MiniCPM-OCR 1.0).
    builder: str
    # "bpe-llama3" | "bpe-qwen2" | "bpe-qwen35" (byte-level BPE with that published split) | "spm-llama"
    tokenizer: str
    full: dict[str, int]               # published dims (vocab = published vocab_size)
    tiny: dict[str, int]               # the tiny dims (vocab: the tiny tokenizer's size, padded)
    config: dict[str, Any]             # config.json template (published key order)
    generation_config: dict[str, Any]  # generation_config.json template
    preprocessor_config: dict[str, Any]
    added_tokens: Tokens               # appended after the trained vocabulary, in id order
    chat_template: str                 # in tokenizer_config.json ("resampler") or chat_template.jinja
    tokenizer_config: dict[str, Any] = field(default_factory=dict)  # without the template / generated keys
    processor_config: dict[str, Any] | None = None  # processor_config.json (transformers-5 layouts)
    # resampler layout
    llm: str = ""                      # LLM tensor layout: "llama" | "qwen2" (q/k/v bias) | "qwen3" (q/k norm)
    query_num: int = 0
    tie_word_embeddings: bool = False
    audio: bool = False                # MiniCPM-o: apm.*, audio_projection_layer.*, tts.*
    tts_layout: str = ""               # "chattts" (o-2.6) | "minicpmtts" (o-4.5)
    longrope: tuple[float, ...] = ()   # published longrope factors ("$longrope", resampled to head_dim / 2)
    # tokenizer files
    spm_user_symbols: tuple[str, ...] = ()        # sentencepiece families: pieces inside the .model
    published_tokenizer_class: str = ""
    tokenizer_files: tuple[str, ...] = ()         # extra tokenizer files the published repo ships
    # special_tokens_map.json keys besides additional_special_tokens (published Qwen-based maps omit bos/unk)
    special_map_keys: tuple[str, ...] = ("eos_token", "pad_token")
    # Synthetic variants of the same family (same weights and tokenizer): synthetic key -> replaced fields,
    # e.g. MiniCPM-V 4.6-Thinking's chat template and generation config.
    variants: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)


@dataclass(frozen=True)
class ReferenceHints:
    """What tests/reference.py builds as the family's independent torch reference."""

    llm: str        # its LLM builder ("llama" | "qwen2" | "qwen3"; "minicpm" when config.json has MiniCPM scales)
    vit_grid: str   # "tgt": position ids from the slice's (h, w) patch grid; "flat": 2.5's 1 x (h*w) grid
    resampler: str  # "2d" | "3d" (temporal sin-cos ids; a still image gets id -1 = no temporal term)
    source: str     # where the published formulas were read
