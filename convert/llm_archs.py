"""The language-model architectures inside MiniCPM-V checkpoints, as llama.cpp names and reads them.

Each entry says which GGUF architecture the text model becomes, how published tensors change on the way
(q/k rows permuted from Hugging Face's rotate-half layout to llama.cpp's interleaved rope, or Qwen3.5's
adjustments in `qwen35`), and which extra metadata the architecture's loader reads (llama.cpp's
llama-model.cpp / convert_hf_to_gguf.py are the reference)."""

from __future__ import annotations

import dataclasses
import functools
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
    scaling = _longrope(config)
    if scaling is not None:
        # MiniCPMLongRoPE multiplies cos and sin by this at every length; llama.cpp's rope takes it as
        # rope.scaling.attn_factor (its mscale), 1 when absent.
        orig = int(require(scaling, "original_max_position_embeddings"))
        max_pos = int(require(config, "max_position_embeddings"))
        writer.add_rope_scaling_attn_factors(math.sqrt(1 + math.log(max_pos / orig) / math.log(orig)))


def _llama_metadata(writer: GGUFWriter, config: dict[str, Any]) -> None:
    writer.add_rope_dimension_count(head_dim(config))


def _longrope(config: dict[str, Any]) -> dict[str, Any] | None:
    scaling = config.get("rope_scaling") or {}
    return scaling if scaling.get("rope_type", scaling.get("type")) in ("longrope", "su") else None


def rope_factor_tensors(config: dict[str, Any]) -> dict[str, np.ndarray]:
    """LongRoPE's per-dimension factors, which llama.cpp takes as tensors (MiniCPM4's rope). llama.cpp uses the
    long list when the context exceeds original_max_position_embeddings, as transformers' Llama does by sequence
    length; a MiniCPM-form config's MiniCPMLongRoPE picks one list once (long iff max_position_embeddings >
    original_max_position_embeddings), so that list is written as both."""
    scaling = _longrope(config)
    if scaling is None:
        return {}
    long_factor, short_factor = scaling.get("long_factor"), scaling.get("short_factor")
    n_pairs = head_dim(config) // 2
    if not (long_factor and short_factor) or len(long_factor) != n_pairs or len(short_factor) != n_pairs:
        raise ConversionError("rope_scaling needs long_factor and short_factor of head_dim/2 values each")
    if _minicpm_form(config):
        orig = int(require(scaling, "original_max_position_embeddings"))
        long_factor = short_factor = (long_factor if int(require(config, "max_position_embeddings")) > orig
                                      else short_factor)
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


# ---- what the pinned loader accepts ------------------------------------------------------------------------
# llama-cpp-python 0.3.36's llama.cpp is the reference: src/llama-model.cpp (load_hparams), src/models/<arch>.cpp
# (load_arch_hparams, load_arch_tensors and the graph's asserts), src/llama-hparams.h. A config it cannot load
# (or whose graph would abort the process) is refused here, before anything is written.

MAX_LAYERS = 512  # LLAMA_MAX_LAYERS (src/llama-hparams.h); load_hparams asserts n_layer <= it
# config.json counts every architecture's loader reads (as uint32) and sizes tensors by.
_COUNT_KEYS = ("num_hidden_layers", "hidden_size", "num_attention_heads", "intermediate_size", "vocab_size",
               "max_position_embeddings")
_OPTIONAL_COUNT_KEYS = ("num_key_value_heads", "head_dim")

# GGUF tensor name -> (numpy shape, the config keys that shape follows from, whether the loader requires it)
ExpectedTensors = dict[str, tuple[Shape, tuple[str, ...], bool]]


def _check_count(config: dict[str, Any], key: str) -> None:
    value = config[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConversionError(f"config.json's {key} must be a positive integer, not {value!r}")


def _rope_type(scaling: Any) -> str:
    scaling = scaling or {}
    return str(scaling.get("rope_type", scaling.get("type")) or "default") if isinstance(scaling, dict) else "?"


def _check_common(arch: "LlmArch", config: dict[str, Any]) -> None:
    for key in _COUNT_KEYS + arch.count_keys:
        require(config, key)
        _check_count(config, key)
    for key in _OPTIONAL_COUNT_KEYS:
        if config.get(key) is not None:
            _check_count(config, key)
    n_layer = config["num_hidden_layers"]
    if n_layer > MAX_LAYERS:
        raise ConversionError(f"config.json's num_hidden_layers is {n_layer}; llama.cpp loads at most {MAX_LAYERS}")
    n_head = config["num_attention_heads"]
    n_head_kv = config.get("num_key_value_heads") or n_head
    if n_head % n_head_kv:
        # n_gqa = n_head / n_head_kv (src/llama-hparams.cpp); ggml_mul_mat broadcasts each key/value head over
        # a whole number of query heads (ggml.c, ggml_can_mul_mat asserts it when the graph is built).
        raise ConversionError(f"config.json's num_attention_heads {n_head} is not a multiple of "
                              f"num_key_value_heads {n_head_kv}, which llama.cpp needs")
    if arch.whole_head_rope:
        # llama: load_hparams throws unless n_rot == n_embd_head_k; qwen2, qwen3, minicpm (granite's graph):
        # GGML_ASSERT(n_embd_head == n_rot). The converter writes the whole head as rotated.
        factor = rope_parameter(config, "partial_rotary_factor", 1.0)
        if factor != 1.0:
            raise ConversionError(f"config.json's partial_rotary_factor is {factor}; llama.cpp's "
                                  f"{arch.gguf_arch} rotates whole heads")
        for key, allowed in (("rope_scaling", arch.rope_scaling_types), ("rope_parameters", ("default",))):
            if _rope_type(config.get(key)) not in allowed:
                raise ConversionError(f"config.json's {key} type {_rope_type(config.get(key))!r} is not converted "
                                      f"for llama.cpp's {arch.gguf_arch} (only {', '.join(map(repr, allowed))})")


def _dense_tensors(config: dict[str, Any], arch: str) -> ExpectedTensors:
    """What llama.cpp's llama / minicpm / qwen2 / qwen3 loaders create (src/models/<arch>.cpp,
    load_arch_tensors; create_tensor_qkv in src/llama-model.cpp), in numpy order."""
    n_embd, n_vocab, n_ff = (int(config[k]) for k in ("hidden_size", "vocab_size", "intermediate_size"))
    n_head = int(config["num_attention_heads"])
    n_head_kv = int(config.get("num_key_value_heads") or n_head)
    head = head_dim(config)  # the key (and value) length written, or n_embd / n_head as the loader derives it
    head_keys = ("head_dim",) if config.get("head_dim") else ("hidden_size", "num_attention_heads")
    q_keys, kv_keys = ("num_attention_heads", *head_keys), ("num_key_value_heads", *head_keys)
    embd, ff = ("hidden_size",), ("intermediate_size", "hidden_size")
    if arch == "qwen2":  # q and output are n_embd x n_embd
        n_q, q_keys = n_embd, embd
    else:
        n_q = n_head * head
    n_kv = n_head_kv * head
    tensors: ExpectedTensors = {
        "token_embd.weight": ((n_vocab, n_embd), ("vocab_size", "hidden_size"), True),
        "output_norm.weight": ((n_embd,), embd, True),
        "output.weight": ((n_vocab, n_embd), ("vocab_size", "hidden_size"), False),
    }
    if arch == "qwen2":
        tensors["output.bias"] = ((n_vocab,), ("vocab_size",), False)
    if arch in ("llama", "minicpm"):
        names = (("rope_factors_long.weight", "rope_factors_short.weight") if _longrope(config)
                 else ("rope_freqs.weight",))
        tensors.update({name: ((head // 2,), ("rope_scaling", *head_keys), False) for name in names})
    for il in range(int(config["num_hidden_layers"])):
        layer = {
            "attn_norm.weight": ((n_embd,), embd, True),
            "attn_q.weight": ((n_q, n_embd), (*q_keys, "hidden_size"), True),
            "attn_k.weight": ((n_kv, n_embd), (*kv_keys, "hidden_size"), True),
            "attn_v.weight": ((n_kv, n_embd), (*kv_keys, "hidden_size"), True),
            "attn_q.bias": ((n_q,), q_keys, False),
            "attn_k.bias": ((n_kv,), kv_keys, False),
            "attn_v.bias": ((n_kv,), kv_keys, False),
            "attn_output.weight": ((n_embd, n_q), ("hidden_size", *q_keys), True),
            "ffn_norm.weight": ((n_embd,), embd, True),
            "ffn_gate.weight": ((n_ff, n_embd), ff, True),
            "ffn_up.weight": ((n_ff, n_embd), ff, True),
            "ffn_down.weight": ((n_embd, n_ff), ff, True),
        }
        if arch in ("llama", "minicpm"):  # optional output and MLP biases
            layer.update({
                "attn_output.bias": ((n_embd,), embd, False),
                "ffn_gate.bias": ((n_ff,), ("intermediate_size",), False),
                "ffn_up.bias": ((n_ff,), ("intermediate_size",), False),
                "ffn_down.bias": ((n_embd,), embd, False),
            })
        if arch == "qwen3":
            layer.update({
                "attn_q_norm.weight": ((head,), head_keys, True),
                "attn_k_norm.weight": ((head,), head_keys, True),
            })
        tensors.update({f"blk.{il}.{name}": spec for name, spec in layer.items()})
    return tensors


def _check_qwen2(config: dict[str, Any]) -> None:
    n_embd, n_head = config["hidden_size"], config["num_attention_heads"]
    if head_dim(config) * n_head != n_embd:
        # src/models/qwen2.cpp: attn_q and attn_output are n_embd x n_embd.
        raise ConversionError(f"config.json's head_dim {head_dim(config)} x num_attention_heads {n_head} is not "
                              f"hidden_size {n_embd}, which llama.cpp's qwen2 needs")


def _no_check(config: dict[str, Any]) -> None:
    return None


# Config keys behind tensors a loader has no place for, by name ending.
_TENSOR_KEYS = (((".attn_q.bias", ".attn_k.bias", ".attn_v.bias", ".attn_output.bias"), "attention_bias"),
                ((".ffn_gate.bias", ".ffn_up.bias", ".ffn_down.bias"), "mlp_bias"),
                (("rope_factors_long.weight", "rope_factors_short.weight", "rope_freqs.weight"), "rope_scaling"))


@dataclass(frozen=True)
class LlmArch:
    gguf_arch: str
    adapt: TensorAdapter = as_published
    extra_metadata: Callable[[GGUFWriter, dict[str, Any]], None] = field(default=_no_metadata)
    # Published name endings gguf's tensor-name table does not know, and the ending it knows them by.
    renames: tuple[tuple[str, str], ...] = ()
    # What the pinned llama.cpp loader accepts: config counts beyond the common ones, a check of the
    # architecture's own hyper-parameter relations, and the tensors (with shapes) its loader creates.
    count_keys: tuple[str, ...] = ()
    check: Callable[[dict[str, Any]], None] = _no_check
    tensors: Callable[[dict[str, Any]], ExpectedTensors] | None = None
    tensor_hint: Callable[[dict[str, Any], str], str | None] = lambda config, name: None
    # n_rot must be the head size, and only these rope_scaling types are converted (qwen35 checks its own rope).
    whole_head_rope: bool = True
    rope_scaling_types: tuple[str, ...] = ("default",)

    def renamed(self, name: str) -> str:
        for published, known in self.renames:
            if name.endswith(published):
                return name[: -len(published)] + known
        return name

    def check_config(self, config: dict[str, Any]) -> None:
        """Refuse, in one line naming the config key, hyper-parameters the pinned llama.cpp cannot load."""
        _check_common(self, config)
        self.check(config)

    def check_tensors(self, config: dict[str, Any], planned: list[tuple[str, Shape, str]]) -> None:
        """Every planned (GGUF name, shape, source) is one the loader creates, at the shape it expects from the
        config, and nothing it requires is missing (llama-model-loader.cpp: 'wrong shape', 'missing tensor',
        'wrong number of tensors')."""
        expected = self.tensors(config) if self.tensors else _dense_tensors(config, self.gguf_arch)

        def hint(name: str) -> str:
            key = self.tensor_hint(config, name) or next(
                (key for endings, key in _TENSOR_KEYS if name.endswith(endings)), None)
            return f" (see config.json's {key})" if key else ""

        seen: set[str] = set()
        for name, shape, source in planned:
            if name in seen:
                raise ConversionError(f"two checkpoint tensors become {name}, the second {source}")
            if name not in expected:
                raise ConversionError(f"llama.cpp's {self.gguf_arch} loader has no place for {source} "
                                      f"(as {name}){hint(name)}")
            want, keys, _ = expected[name]
            if tuple(shape) != want:
                raise ConversionError(f"{source} has shape {list(shape)} but llama.cpp's {self.gguf_arch} expects "
                                      f"{list(want)} from config.json's {', '.join(dict.fromkeys(keys))}")
            seen.add(name)
        missing = [name for name, (_, _, required) in expected.items() if required and name not in seen]
        if missing:
            raise ConversionError(f"the checkpoint has no tensor for {missing[0]}, which llama.cpp's "
                                  f"{self.gguf_arch} requires{hint(missing[0])}")


LLM_ARCHS: dict[str, LlmArch] = {
    "llama": LlmArch("llama", interleave_rotary, _llama_metadata, rope_scaling_types=("default", "longrope", "su")),
    "qwen2": LlmArch("qwen2", check=_check_qwen2),
    "qwen3": LlmArch("qwen3"),
    "minicpm": LlmArch("minicpm", interleave_rotary, _minicpm_metadata,
                       rope_scaling_types=("default", "longrope", "su")),
    "qwen35": LlmArch("qwen35", qwen35.adapt, qwen35.write_metadata, qwen35.RENAMES, count_keys=qwen35.COUNT_KEYS,
                      check=qwen35.check, tensors=qwen35.expected_tensors, tensor_hint=qwen35.tensor_hint,
                      whole_head_rope=False),
}
# MiniCPM-V 4.7: qwen35 for canvas positions fed as embedding rows (qwen35.canvas_sections).
LLM_ARCHS["qwen35-canvas"] = dataclasses.replace(
    LLM_ARCHS["qwen35"], extra_metadata=functools.partial(qwen35.write_metadata, canvas=True))


def _minicpm_form(config: dict[str, Any]) -> bool:
    return "scale_emb" in config


def llm_arch_for(config: dict[str, Any], published: str) -> LlmArch:
    """The family's published LLM architecture, except that a MiniCPM-form config (scale_emb, scale_depth,
    dim_model_base: MiniCPM4 before its scales are folded into Llama-form weights) needs llama.cpp's
    minicpm architecture, which applies those scales."""
    return LLM_ARCHS["minicpm" if _minicpm_form(config) else published]


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
