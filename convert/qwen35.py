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

What the pinned loader (llama-cpp-python 0.3.36's llama.cpp) cannot load is refused before anything is
written (`check`, `expected_tensors`; the shared checks are in `llm_archs`): it sizes linear-attention value
heads by the key head size, repeats key heads a whole number of times, rotates an even number of dimensions
within a head, and splits them into at most four M-RoPE sections that must give every rotary pair a position.
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


# Layer kinds Qwen3.5's layer_types names; llama.cpp's qwen35 knows these two (recurrent or not, per layer).
LAYER_KINDS = ("linear_attention", "full_attention")
# Counts `llm_archs` checks are positive integers before `check` runs.
COUNT_KEYS = ("linear_conv_kernel_dim", "linear_key_head_dim", "linear_value_head_dim",
              "linear_num_key_heads", "linear_num_value_heads")


def recurrent_layers(config: dict[str, Any]) -> list[bool]:
    """Per layer, whether it is a linear-attention (recurrent) layer: layer_types, or transformers' default
    from full_attention_interval (every interval-th layer is full attention), as llama.cpp's loader derives it
    when the GGUF has no recurrent_layers array (src/models/qwen35.cpp, load_arch_hparams)."""
    n_layer = int(require(config, "num_hidden_layers"))
    interval = full_attention_interval(config)
    layer_types = config.get("layer_types") or [
        "full_attention" if (i + 1) % interval == 0 else "linear_attention" for i in range(n_layer)]
    if not isinstance(layer_types, list) or len(layer_types) != n_layer:
        count = len(layer_types) if isinstance(layer_types, list) else "no list of"
        raise ConversionError(f"config.json's layer_types has {count} entries for {n_layer} layers")
    unknown = [t for t in layer_types if t not in LAYER_KINDS]
    if unknown:
        raise ConversionError(f"config.json's layer_types holds {unknown[0]!r}; llama.cpp's qwen35 knows only "
                              f"{' and '.join(LAYER_KINDS)} layers")
    return [t == "linear_attention" for t in layer_types]


def full_attention_interval(config: dict[str, Any]) -> int:
    interval = config.get("full_attention_interval", 4)
    if isinstance(interval, bool) or not isinstance(interval, int) or interval < 1:
        raise ConversionError(f"config.json's full_attention_interval must be a positive integer, not {interval!r}")
    return interval


def rope_layout(config: dict[str, Any]) -> tuple[int, list[int]]:
    """The rotated dimensions per head (llama.cpp's n_rot) and the four M-RoPE sections, checked against what
    ggml's rope accepts (ggml-cpu/ops.cpp: n_dims even and <= the head size; sections not all zero and their sum
    <= the head size) and against what matches transformers: every rotary pair in a t/h/w section (a pair in
    none takes llama.cpp's fourth position, 0 for text, where transformers uses the temporal one)."""
    head = head_dim(config)
    factor = rope_parameter(config, "partial_rotary_factor", 0.25)
    n_rot = int(head * factor)
    if not 0 < factor <= 1 or n_rot < 2 or n_rot % 2:
        raise ConversionError(f"config.json's partial_rotary_factor {factor} rotates {n_rot} of {head} head "
                              f"dimensions; llama.cpp needs an even number from 2 to {head}")
    published = (config.get("rope_parameters") or {}).get("mrope_section")
    sections = list(published) if published else default_mrope_sections(n_rot // 2)
    if (len(sections) > 4 or any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in sections)
            or not any(sections[:3])):
        raise ConversionError(f"config.json's mrope_section {sections} is not what llama.cpp takes: up to 4 "
                              f"counts of rotary pairs, not negative, the first three not all 0")
    sections = (sections + [0] * 4)[:4]
    if sum(sections) > head:
        raise ConversionError(f"config.json's mrope_section {published} spans {sum(sections)} rotary pairs; "
                              f"llama.cpp allows at most the head size {head}")
    uncovered = next((k for k in range(n_rot // 2) if not _in_section(k % sum(sections), sections)), None)
    if uncovered is not None:
        raise ConversionError(f"config.json's mrope_section {published} gives rotary pair {uncovered} of "
                              f"{n_rot // 2} no t/h/w section (llama.cpp's interleaved M-RoPE would use "
                              f"position 0 for it)")
    return n_rot, sections


def _in_section(sector: int, sections: list[int]) -> bool:
    """ggml's interleaved M-RoPE: pair sector s belongs to section s % 3 if s < 3 * that section's size."""
    return sector < 3 * sections[sector % 3]


def check(config: dict[str, Any]) -> None:
    """Refuse what llama.cpp's qwen35 cannot load or run (the shared checks ran before)."""
    k_dim, v_dim = int(config["linear_key_head_dim"]), int(config["linear_value_head_dim"])
    if v_dim != k_dim:
        # src/models/qwen35.cpp load_block_trunk: head_v_dim = ssm_d_state (the key head size);
        # src/models/delta-net-base.cpp: GGML_ASSERT(S_k == S_v).
        raise ConversionError(f"config.json's linear_value_head_dim {v_dim} differs from linear_key_head_dim "
                              f"{k_dim}; llama.cpp's qwen35 needs equal key and value head sizes")
    n_k, n_v = int(config["linear_num_key_heads"]), int(config["linear_num_value_heads"])
    if n_v % n_k:
        # src/models/delta-net-base.cpp: GGML_ASSERT(H_v % H_k == 0); qwen35.cpp repeats key heads.
        raise ConversionError(f"config.json's linear_num_value_heads {n_v} is not a multiple of "
                              f"linear_num_key_heads {n_k}, which llama.cpp's qwen35 needs")
    rope_type = (config.get("rope_parameters") or {}).get("rope_type", "default")
    if rope_type != "default":
        raise ConversionError(f"config.json's rope_parameters rope_type {rope_type!r} is not converted for "
                              f"Qwen3.5 (only 'default')")
    recurrent_layers(config)
    rope_layout(config)


def expected_tensors(config: dict[str, Any]) -> dict[str, tuple[Shape, tuple[str, ...], bool]]:
    """What llama.cpp's qwen35 loader creates (src/models/qwen35.cpp, load_arch_tensors), in numpy order:
    GGUF name -> (shape, the config keys it follows from, required). The loader sizes value heads by
    ssm_d_state (the key head size), which `check` has made equal to the value head size."""
    n_embd, n_vocab, n_ff = (int(config[k]) for k in ("hidden_size", "vocab_size", "intermediate_size"))
    n_head = int(config["num_attention_heads"])
    n_head_kv = int(config.get("num_key_value_heads") or n_head)
    head = head_dim(config)
    head_keys = ("head_dim",) if config.get("head_dim") else ("hidden_size", "num_attention_heads")
    d_state, n_k, n_v = (int(config[k]) for k in ("linear_key_head_dim", "linear_num_key_heads",
                                                  "linear_num_value_heads"))
    key_dim, value_dim = d_state * n_k, d_state * n_v
    linear_keys = ("linear_key_head_dim", "linear_num_key_heads", "linear_num_value_heads")
    embd, ff = ("hidden_size",), ("intermediate_size", "hidden_size")
    tensors = {
        "token_embd.weight": ((n_vocab, n_embd), ("vocab_size", "hidden_size"), True),
        "output_norm.weight": ((n_embd,), embd, True),
        "output.weight": ((n_vocab, n_embd), ("vocab_size", "hidden_size"), False),
    }
    q_keys, kv_keys = ("num_attention_heads", *head_keys), ("num_key_value_heads", *head_keys)
    for il, recurrent in enumerate(recurrent_layers(config)):
        layer = {
            "attn_norm.weight": ((n_embd,), embd, True),
            "post_attention_norm.weight": ((n_embd,), embd, True),
            "ffn_gate.weight": ((n_ff, n_embd), ff, True),
            "ffn_up.weight": ((n_ff, n_embd), ff, True),
            "ffn_down.weight": ((n_embd, n_ff), ff, True),
        }
        if recurrent:
            conv_keys = ("linear_conv_kernel_dim", *linear_keys)
            layer.update({
                # The loader marks attn_qkv and attn_gate optional, but the graph multiplies by both.
                "attn_qkv.weight": ((2 * key_dim + value_dim, n_embd), (*linear_keys, "hidden_size"), True),
                "attn_gate.weight": ((value_dim, n_embd), (*linear_keys, "hidden_size"), True),
                "ssm_conv1d.weight": ((2 * key_dim + value_dim, int(config["linear_conv_kernel_dim"])),
                                      conv_keys, True),
                "ssm_dt.bias": ((n_v,), ("linear_num_value_heads",), True),
                "ssm_a": ((n_v,), ("linear_num_value_heads",), True),
                "ssm_beta.weight": ((n_v, n_embd), ("linear_num_value_heads", "hidden_size"), True),
                "ssm_alpha.weight": ((n_v, n_embd), ("linear_num_value_heads", "hidden_size"), True),
                "ssm_norm.weight": ((d_state,), ("linear_key_head_dim",), True),
                "ssm_out.weight": ((n_embd, value_dim), ("hidden_size", *linear_keys), True),
            })
        else:
            layer.update({
                # Query and output gate in one projection: 2 x heads x head size rows.
                "attn_q.weight": ((2 * n_head * head, n_embd), (*q_keys, "hidden_size"), True),
                "attn_k.weight": ((n_head_kv * head, n_embd), (*kv_keys, "hidden_size"), True),
                "attn_v.weight": ((n_head_kv * head, n_embd), (*kv_keys, "hidden_size"), True),
                "attn_q.bias": ((2 * n_head * head,), q_keys, False),
                "attn_k.bias": ((n_head_kv * head,), kv_keys, False),
                "attn_v.bias": ((n_head_kv * head,), kv_keys, False),
                "attn_output.weight": ((n_embd, n_head * head), ("hidden_size", *q_keys), True),
                "attn_q_norm.weight": ((head,), head_keys, True),
                "attn_k_norm.weight": ((head,), head_keys, True),
            })
        tensors.update({f"blk.{il}.{name}": spec for name, spec in layer.items()})
    return tensors


_LINEAR_ONLY = ("attn_qkv.", "attn_gate.", "ssm_")
_FULL_ONLY = ("attn_q.", "attn_k.", "attn_v.", "attn_output.", "attn_q_norm.", "attn_k_norm.")


def tensor_hint(config: dict[str, Any], name: str) -> str | None:
    """The config key behind an unexpected or missing layer tensor: one of the other layer kind."""
    part = name.split(".", 2)[-1]
    if name.startswith("blk.") and part.startswith(_LINEAR_ONLY + _FULL_ONLY):
        return "layer_types" if config.get("layer_types") else "full_attention_interval"
    return None


def canvas_sections(sections: list[int]) -> list[int]:
    """The rope sections of a GGUF fed canvas positions as [sequence index, H, W, T] (MiniCPM-V 4.7): T moves
    from section 0 to the fourth slot, which ggml's interleaved M-RoPE uses for every pair outside the h/w
    sections, exactly the pairs transformers rotates by T; section 0 rotates nothing, so its position only
    orders the KV cache (causally, as transformers masks by sequence index)."""
    if sections[3]:
        raise ConversionError(f"mrope_section {sections} uses a fourth section, which canvas positions need free")
    return [0, sections[1], sections[2], sections[0]]


def write_metadata(writer: GGUFWriter, config: dict[str, Any], canvas: bool = False) -> None:
    """`canvas`: the rope sections for canvas positions (`canvas_sections`)."""
    arch = writer.arch
    writer.add_ssm_conv_kernel(int(require(config, "linear_conv_kernel_dim")))
    writer.add_ssm_state_size(int(require(config, "linear_key_head_dim")))
    writer.add_ssm_group_count(int(require(config, "linear_num_key_heads")))
    writer.add_ssm_time_step_rank(int(require(config, "linear_num_value_heads")))
    writer.add_ssm_inner_size(int(require(config, "linear_value_head_dim")) * int(config["linear_num_value_heads"]))
    writer.add_array(f"{arch}.attention.recurrent_layers", recurrent_layers(config))
    writer.add_full_attention_interval(full_attention_interval(config))
    n_rot, sections = rope_layout(config)
    writer.add_rope_dimension_count(n_rot)
    writer.add_rope_dimension_sections(canvas_sections(sections) if canvas else sections)
