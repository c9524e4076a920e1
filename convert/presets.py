"""Quantization presets (data in quant_presets/*.json) and the per-tensor type choice of llama-quantize.

`llm_tensor_types` follows `llama_tensor_get_type` in llama.cpp's src/llama-quant.cpp for the mixtures
our presets name (dense models, no MoE, no importance matrix): which tensors are quantized at all, the
output / tied-embedding rule, the "use more bits" layers of attn_v and ffn_down, and the fallback for
rows whose length a block type cannot hold.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from typing import Iterable, Sequence

from gguf import GGMLQuantizationType as T

from .errors import ConversionError
from .ggml_quant import block_size

_NOT_QUANTIZED = (T.F32, T.F16, T.BF16)

# llama-quant.cpp's tensor_type_fallback: a k-quant whose 256-value blocks do not divide the row
# falls back to a 32-block type, and to F16 when even that does not fit.
_ROW_FALLBACK = {T.Q4_K: T.Q5_0, T.Q5_K: T.Q5_1, T.Q6_K: T.Q8_0, T.Q2_K: T.Q4_0, T.Q3_K: T.Q4_0}

# Substrings of tensor names llama-quantize never quantizes (the ones that can occur in our LLM archs).
_KEEP_SUBSTRINGS = ("_norm.weight", "position_embd", "token_types", "ssm_conv1d")
# convert_hf_to_gguf writes these in float32 whatever the output type (Mamba-style conv kernels).
_ALWAYS_F32 = ("ssm_conv1d",)
# llama-quant.cpp's category_is_attn_v: these share attn_v's "use more bits" counter (Qwen3.5's fused
# linear-attention qkv included).
_ATTN_V_LIKE = ("attn_v.weight", "attn_qkv.weight", "attn_kv_b.weight")


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    llm_ftype: int
    llm_type: T
    llm_sensitive_type: T | None
    mmproj_type: T

    @property
    def llm_is_quantized(self) -> bool:
        return self.llm_type not in _NOT_QUANTIZED


def preset_names() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files("minicpmv_edge.quant_presets").iterdir()
                  if p.name.endswith(".json"))


def load_preset(name: str) -> Preset:
    key = name.lower()
    if key not in preset_names():
        raise ConversionError(f"unknown preset {name!r}; choose one of: {', '.join(preset_names())}")
    raw = json.loads(resources.files("minicpmv_edge.quant_presets").joinpath(f"{key}.json").read_text())
    sensitive = raw.get("llm_sensitive_type")
    return Preset(
        name=key,
        description=raw["description"],
        llm_ftype=int(raw["llm_ftype"]),
        llm_type=T[raw["llm_type"]],
        llm_sensitive_type=T[sensitive] if sensitive else None,
        mmproj_type=T[raw["mmproj_type"]],
    )


def _use_more_bits(i_layer: int, n_layers: int) -> bool:
    return i_layer < n_layers // 8 or i_layer >= 7 * n_layers // 8 or (i_layer - n_layers // 8) % 3 == 2


def _row_fallback(target: T, n_per_row: int) -> T:
    if n_per_row % block_size(target) == 0:
        return target
    fallback = _ROW_FALLBACK.get(target, target)
    return fallback if n_per_row % block_size(fallback) == 0 else T.F16


def unquantized_type(name: str, shape: Sequence[int], float_type: T) -> T:
    """The type convert_hf_to_gguf gives a tensor in an F16/BF16/F32 file: vectors stay float32."""
    return T.F32 if len(shape) < 2 or any(s in name for s in _ALWAYS_F32) else float_type


def llm_tensor_types(tensors: Iterable[tuple[str, Sequence[int]]], preset: Preset, n_layer: int) -> dict[str, T]:
    """Type of every LLM tensor (GGUF names, numpy shapes, in file order) under `preset`."""
    tensors = list(tensors)
    if not preset.llm_is_quantized:
        return {name: unquantized_type(name, shape, preset.llm_type) for name, shape in tensors}

    names = [name for name, _ in tensors]
    tied_embeddings = "output.weight" not in names
    n_attn_v = sum(any(s in name for s in _ATTN_V_LIKE) for name in names)
    i_attn_v = i_ffn_down = 0
    types: dict[str, T] = {}
    for name, shape in tensors:
        quantizable = len(shape) >= 2 and name.endswith("weight") and not any(s in name for s in _KEEP_SUBSTRINGS)
        if not quantizable:
            types[name] = unquantized_type(name, shape, T.F16)
            continue
        n_per_row = shape[-1]
        qtype = preset.llm_type
        if name == "output.weight" or (tied_embeddings and name == "token_embd.weight"):
            if n_per_row % block_size(qtype):
                qtype = T.Q8_0
            elif qtype != T.Q8_0:
                qtype = T.Q6_K
        elif any(s in name for s in _ATTN_V_LIKE):
            if preset.llm_sensitive_type and _use_more_bits(i_attn_v, n_attn_v):
                qtype = preset.llm_sensitive_type
            i_attn_v += 1
        elif "ffn_down" in name:
            if preset.llm_sensitive_type and _use_more_bits(i_ffn_down, n_layer):
                qtype = preset.llm_sensitive_type
            i_ffn_down += 1
        types[name] = _row_fallback(qtype, n_per_row)
    return types


def mmproj_tensor_type(name: str, shape: Sequence[int], preset: Preset) -> T:
    """clip.cpp's rule (as its legacy MiniCPM-V converter writes): only 2-D `.weight` matrices take the
    preset's vision type; vectors and tensors used as graph inputs (resampler.query, pos_embed_k) stay F32,
    because ops such as ggml_norm on them accept F32 only; the patch conv and position table use F16."""
    if len(shape) < 2 or not name.endswith(".weight"):
        return T.F32
    if preset.mmproj_type == T.F32:
        return T.F32
    if "patch_embd" in name or "position_embd" in name:
        return T.F16
    return _row_fallback(preset.mmproj_type, shape[-1])
