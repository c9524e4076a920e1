"""The language-model architectures inside MiniCPM-V checkpoints, as llama.cpp names and reads them.

Each entry says which GGUF architecture the text model becomes, how published tensors change on the way
(q/k rows permuted from Hugging Face's rotate-half layout to llama.cpp's interleaved rope, or Qwen3.5's
adjustments in `qwen35`), and which extra metadata the architecture's loader reads (llama.cpp's
llama-model.cpp / convert_hf_to_gguf.py are the reference)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
from gguf import GGUFWriter, RopeScalingType

from . import qwen35
from .errors import ConversionError
from .hparams import Shape, Transform, head_dim, require, rope_parameter


def _minicpm_metadata(writer: GGUFWriter, config: dict[str, Any]) -> None:
    n_layer = require(config, "num_hidden_layers")
    writer.add_embedding_scale(float(require(config, "scale_emb")))
    writer.add_residual_scale(float(require(config, "scale_depth")) / math.sqrt(n_layer))
    writer.add_logit_scale(require(config, "hidden_size") / require(config, "dim_model_base"))


def _llama_metadata(writer: GGUFWriter, config: dict[str, Any]) -> None:
    writer.add_rope_dimension_count(head_dim(config))


def _longrope(config: dict[str, Any]) -> dict[str, Any] | None:
    scaling = config.get("rope_scaling") or {}
    return scaling if scaling.get("rope_type", scaling.get("type")) in ("longrope", "su") else None


def rope_factor_tensors(config: dict[str, Any]) -> dict[str, np.ndarray]:
    """LongRoPE's per-dimension factors, which llama.cpp takes as tensors (MiniCPM4's rope)."""
    scaling = _longrope(config)
    if scaling is None:
        return {}
    long_factor, short_factor = scaling.get("long_factor"), scaling.get("short_factor")
    n_pairs = head_dim(config) // 2
    if not (long_factor and short_factor) or len(long_factor) != n_pairs or len(short_factor) != n_pairs:
        raise ConversionError("rope_scaling needs long_factor and short_factor of head_dim/2 values each")
    return {
        "rope_factors_long.weight": np.asarray(long_factor, dtype=np.float32),
        "rope_factors_short.weight": np.asarray(short_factor, dtype=np.float32),
    }


def _no_metadata(writer: GGUFWriter, config: dict[str, Any]) -> None:
    return None


# (GGUF name, published shape, LLM config) -> (GGUF shape, transform of the whole tensor or None)
TensorAdapter = Callable[[str, Shape, dict[str, Any]], tuple[Shape, Transform | None]]


def as_published(gguf_name: str, shape: Shape, config: dict[str, Any]) -> tuple[Shape, Transform | None]:
    return shape, None


def interleave_rotary(gguf_name: str, shape: Shape, config: dict[str, Any]) -> tuple[Shape, Transform | None]:
    """HF stores q/k rows for rotate-half rope; llama.cpp's NORM rope (llama, minicpm) wants them interleaved."""
    if gguf_name.endswith("attn_q.weight"):
        n_head = int(config["num_attention_heads"])
        return shape, lambda w: permute_rotary(w, n_head)
    if gguf_name.endswith("attn_k.weight"):
        n_head_kv = int(config.get("num_key_value_heads") or config["num_attention_heads"])
        return shape, lambda w: permute_rotary(w, n_head_kv)
    return shape, None


@dataclass(frozen=True)
class LlmArch:
    gguf_arch: str
    adapt: TensorAdapter = as_published
    extra_metadata: Callable[[GGUFWriter, dict[str, Any]], None] = field(default=_no_metadata)
    # Published name endings gguf's tensor-name table does not know, and the ending it knows them by.
    renames: tuple[tuple[str, str], ...] = ()

    def renamed(self, name: str) -> str:
        for published, known in self.renames:
            if name.endswith(published):
                return name[: -len(published)] + known
        return name


LLM_ARCHS: dict[str, LlmArch] = {
    "llama": LlmArch("llama", interleave_rotary, _llama_metadata),
    "qwen2": LlmArch("qwen2"),
    "qwen3": LlmArch("qwen3"),
    "minicpm": LlmArch("minicpm", interleave_rotary, _minicpm_metadata),
    "qwen35": LlmArch("qwen35", qwen35.adapt, qwen35.write_metadata, qwen35.RENAMES),
}


def llm_arch_for(config: dict[str, Any], published: LlmArch) -> LlmArch:
    """The family's published LLM architecture, except that a MiniCPM-form config (scale_emb, scale_depth,
    dim_model_base: MiniCPM4 before its scales are folded into Llama-form weights) needs llama.cpp's
    minicpm architecture, which applies those scales."""
    return LLM_ARCHS["minicpm"] if "scale_emb" in config else published


def permute_rotary(weights: np.ndarray, n_head: int) -> np.ndarray:
    """Reorder each head's rows from rotate-half pairs (i, i + d/2) to interleaved pairs (2i, 2i + 1)."""
    rows = weights.shape[0]
    return (weights.reshape(n_head, 2, rows // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def write_common_metadata(writer: GGUFWriter, config: dict[str, Any]) -> None:
    """The hyper-parameters every llama.cpp decoder architecture reads."""
    writer.add_context_length(int(require(config, "max_position_embeddings")))
    writer.add_embedding_length(int(require(config, "hidden_size")))
    writer.add_block_count(int(require(config, "num_hidden_layers")))
    writer.add_feed_forward_length(int(require(config, "intermediate_size")))
    writer.add_head_count(int(require(config, "num_attention_heads")))
    writer.add_head_count_kv(int(config.get("num_key_value_heads") or config["num_attention_heads"]))
    writer.add_layer_norm_rms_eps(float(require(config, "rms_norm_eps")))
    writer.add_rope_freq_base(rope_parameter(config, "rope_theta", 10000.0))
    if config.get("head_dim"):
        writer.add_key_length(int(config["head_dim"]))
        writer.add_value_length(int(config["head_dim"]))
    scaling = _longrope(config)
    if scaling is not None:
        writer.add_rope_scaling_type(RopeScalingType.LONGROPE)
        writer.add_rope_scaling_orig_ctx_len(int(require(scaling, "original_max_position_embeddings")))
