"""Qwen3.5's text model (MiniCPM-V 4.6) as llama.cpp's `qwen35` architecture reads it: three gated-delta-net
(linear attention) layers for every full-attention layer.

What changes between the published tensors and the GGUF, following llama.cpp's loader and graph
(src/models/qwen35.cpp, and its converter as the reference for the conventions):
- Qwen3.5's RMSNorms scale by (1 + weight); llama.cpp's scale by the weight, so 1 is added, except to the
  gated norm inside the linear-attention block, which scales by the weight itself.
- A_log becomes A = -exp(A_log); dt_bias is the bias of the dt projection; the depthwise conv kernel
  loses its singleton channel axis.
- With fewer key heads than value heads, HF groups the value heads by key head ([k0: v0 v1, k1: v0 v1]) while
  ggml's broadcast repeats key heads tiled ([k0 k1 k0 k1]); every value-head axis is reordered to match.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from gguf import GGUFWriter

from .errors import ConversionError
from .hparams import Shape, Transform, head_dim, require, rope_parameter

RENAMES = ((".linear_attn.dt_bias", ".linear_attn.dt_proj.bias"),)


def default_mrope_sections(rotary_pairs: int) -> list[int]:
    """Qwen3.5 always applies interleaved M-RoPE and llama.cpp requires its sections; the published config
    leaves them to transformers' default ([11, 11, 10] for its 32 rotary pairs). Interleaving gives pair k
    to section k % 3, so each section holds every third pair; a pair no section holds would take llama.cpp's
    fourth position (0), so the sections must cover them all, as the default does at the published size."""
    return [len(range(section, rotary_pairs, 3)) for section in range(3)] + [0]


def _tiled(values: np.ndarray, axis: int, n_k: int, n_v: int, width: int) -> np.ndarray:
    """Value heads (each `width` wide along `axis`) from grouped-by-key-head to tiled order."""
    moved = np.moveaxis(values, axis, 0)
    rest = moved.shape[1:]
    reordered = moved.reshape(n_k, n_v // n_k, width, *rest).swapaxes(0, 1).reshape(moved.shape)
    return np.ascontiguousarray(np.moveaxis(reordered, 0, axis))


def adapt(name: str, shape: Shape, config: dict[str, Any]) -> tuple[Shape, Transform | None]:
    """The GGUF shape of the published tensor llama.cpp calls `name`, and what turns its values into llama.cpp's."""
    n_k = int(config.get("linear_num_key_heads", 0))
    n_v = int(config.get("linear_num_value_heads", 0))
    reorder = n_k > 0 and n_v > 0 and n_k != n_v
    k_dim = int(config.get("linear_key_head_dim", 0))
    v_dim = int(config.get("linear_value_head_dim", 0))

    def tiled(axis: int, width: int, skip_rows: int = 0) -> Transform:
        def apply(w: np.ndarray) -> np.ndarray:
            if not reorder:
                return w
            head, tail = np.split(w, [skip_rows], axis=0) if skip_rows else (None, w)
            tail = _tiled(tail, axis, n_k, n_v, width)
            return tail if head is None else np.concatenate([head, tail], axis=0)
        return apply

    if name.endswith("_norm.weight") and not name.endswith("ssm_norm.weight"):
        return shape, lambda w: w + np.float32(1.0)
    if name.endswith("ssm_a"):
        to_tiled = tiled(0, 1)
        return shape, lambda w: to_tiled(-np.exp(w))
    if name.endswith(("ssm_dt.bias", "ssm_alpha.weight", "ssm_beta.weight")):
        return shape, tiled(0, 1)
    if name.endswith("ssm_conv1d.weight"):
        squeezed = (shape[0], shape[-1])
        to_tiled = tiled(0, v_dim, skip_rows=2 * n_k * k_dim)
        return squeezed, lambda w: to_tiled(w.reshape(squeezed))
    if name.endswith("attn_qkv.weight"):
        return shape, tiled(0, v_dim, skip_rows=2 * n_k * k_dim)
    if name.endswith("attn_gate.weight"):
        return shape, tiled(0, v_dim)
    if name.endswith("ssm_out.weight"):
        return shape, tiled(1, v_dim)
    return shape, None


def write_metadata(writer: GGUFWriter, config: dict[str, Any]) -> None:
    arch = writer.arch
    n_layer = int(require(config, "num_hidden_layers"))
    writer.add_ssm_conv_kernel(int(require(config, "linear_conv_kernel_dim")))
    writer.add_ssm_state_size(int(require(config, "linear_key_head_dim")))
    writer.add_ssm_group_count(int(require(config, "linear_num_key_heads")))
    writer.add_ssm_time_step_rank(int(require(config, "linear_num_value_heads")))
    writer.add_ssm_inner_size(int(require(config, "linear_value_head_dim")) * int(config["linear_num_value_heads"]))
    interval = int(config.get("full_attention_interval", 4))
    layer_types = config.get("layer_types") or [
        "full_attention" if (i + 1) % interval == 0 else "linear_attention" for i in range(n_layer)]
    if len(layer_types) != n_layer:
        raise ConversionError(f"config.json's layer_types has {len(layer_types)} entries for {n_layer} layers")
    writer.add_array(f"{arch}.attention.recurrent_layers", [t == "linear_attention" for t in layer_types])
    writer.add_full_attention_interval(interval)
    n_rot = int(head_dim(config) * rope_parameter(config, "partial_rotary_factor", 0.25))
    writer.add_rope_dimension_count(n_rot)
    sections = list((config.get("rope_parameters") or {}).get("mrope_section") or default_mrope_sections(n_rot // 2))
    writer.add_rope_dimension_sections((sections + [0] * 4)[:4])
