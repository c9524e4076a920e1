"""Plan of the language-model GGUF: metadata, tokenizer, and the `llm.*` tensors under llama.cpp's names."""

from __future__ import annotations

import re
from typing import Callable, Iterator

import gguf
import numpy as np
from gguf import GGUFWriter

from .checkpoint import Checkpoint
from .errors import ConversionError
from minicpmv_edge.families import Family
from minicpmv_edge.families.minicpmv4_7 import CANVAS_KEY, CANVAS_MARKERS

from .families import llm_config
from .gguf_out import GgufPlan, PlannedTensor, SourcedTensor
from .int4 import PACKED_PARTS, dequantizer, packed_shape, quant_method
from .hparams import Transform, require
from .llm_archs import llm_arch_for, rope_factor_tensors, write_common_metadata
from .presets import Preset, llm_tensor_types
from .vocab import write_vocab

_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
_LAYER = re.compile(r"^blk\.(\d+)\.")


def _arch_enum(name: str) -> gguf.MODEL_ARCH:
    return next(arch for arch, arch_name in gguf.MODEL_ARCH_NAMES.items() if arch_name == name)


def _source(checkpoint: Checkpoint, hf_name: str, transform: Transform | None,
            load: Callable[[], np.ndarray] | None = None) -> Callable[[], Iterator[np.ndarray]]:
    """Row blocks straight from the shard, or the whole tensor (loaded, e.g. dequantized) when it is transformed."""
    if transform is None and load is None:
        return lambda: checkpoint.row_blocks(hf_name)
    load = load or (lambda: checkpoint.read(hf_name))
    return lambda: iter([transform(load()) if transform else load()])


def _constant(values: np.ndarray) -> Callable[[], Iterator[np.ndarray]]:
    return lambda: iter([values])


def _file_order(name: str) -> tuple[int, str]:
    """Layers in order (llama-quantize's per-layer counters depend on it), global tensors around them."""
    match = _LAYER.match(name)
    if match:
        return int(match.group(1)) + 1, name
    return (0 if name.startswith(("token_embd", "rope_")) else 1 << 30), name


CANVAS_DESCRIPTION = ("MiniCPM-V 4.7 for canvas M-RoPE positions fed as embedding rows [sequence index, H, W, T] "
                      "(rope sections [0, h, w, t]), as minicpmv-edge feeds them; clients feeding token batches "
                      "decode it with wrong positions")


def canvas_markers(family: Family, config: dict) -> list[int]:
    """The marker token ids canvas positions are computed from (config.json, MiniCPMV4_7Config), or [] for a
    family with sequential positions."""
    if family.positions != "canvas":
        return []
    missing = [key for key in CANVAS_MARKERS if not isinstance(config.get(key), int)]
    if missing:
        raise ConversionError(f"config.json lacks {', '.join(missing)}, which {family.title}'s canvas positions "
                              f"are computed from")
    return [int(config[key]) for key in CANVAS_MARKERS]


def plan_llm(checkpoint: Checkpoint, family: Family, preset: Preset) -> GgufPlan:
    layout = family.layout
    config = llm_config(family, checkpoint.config)
    n_layer = int(require(config, "num_hidden_layers"))
    n_vocab = int(require(config, "vocab_size"))
    arch = llm_arch_for(config, family.llm_arch)
    arch.check_config(config)  # what the pinned llama.cpp cannot load fails here, before anything is written
    name_map = gguf.get_tensor_name_map(_arch_enum(arch.gguf_arch), n_layer)

    quantized = quant_method(checkpoint.config)  # quantization_config sits at the top
    named: list[SourcedTensor] = []
    origins: dict[str, str] = {}  # GGUF name -> what it is made from, for the loader checks' messages
    for hf_name, ref in checkpoint.tensors.items():
        if hf_name == layout.lm_head and layout.lm_head:
            inner = arch.renamed("lm_head.weight")  # an untied output projection outside the LLM's prefix
        elif not hf_name.startswith(layout.llm_prefix) or hf_name.endswith(_IGNORED_SUFFIXES):
            continue
        else:
            inner = arch.renamed(layout.llm_inner_prefix + hf_name[len(layout.llm_prefix):])
        shape, load = ref.shape, None
        part = inner.rsplit(".", 1)[-1]
        if quantized and part in PACKED_PARTS:
            if part != "qweight":
                continue  # read together with its qweight
            base = hf_name[: -len(part)]
            inner, shape = inner[: -len(part)] + "weight", packed_shape(quantized["quant_method"].lower(), shape)
            load = dequantizer(quantized, lambda name: checkpoint.read(name, as_stored=True), base)
        gguf_name = name_map.get_name(inner, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise ConversionError(f"no llama.cpp tensor for {hf_name} in a {arch.gguf_arch} model")
        shape, transform = arch.adapt(gguf_name, tuple(shape), config)
        named.append((gguf_name, shape, _source(checkpoint, hf_name, transform, load)))
        origins[gguf_name] = hf_name
    for gguf_name, values in rope_factor_tensors(config).items():
        named.append((gguf_name, values.shape, _constant(values)))
        origins[gguf_name] = "config.json's rope_scaling"
    if not any(name == "token_embd.weight" for name, _, _ in named):
        raise ConversionError(f"the checkpoint has no token embeddings (embed_tokens.weight under {layout.llm_prefix})")
    arch.check_tensors(config, [(name, shape, origins[name]) for name, shape, _ in named])
    named.sort(key=lambda item: _file_order(item[0]))

    types = llm_tensor_types([(name, shape) for name, shape, _ in named], preset, n_layer)
    tensors = [PlannedTensor(name, tuple(shape), types[name], source) for name, shape, source in named]

    preprocessor = checkpoint.json_file("preprocessor_config.json") or {}
    top = checkpoint.config
    use_image_id = bool(preprocessor.get("use_image_id", top.get("use_image_id", False)))
    max_slice_nums = int(preprocessor.get("max_slice_nums", (top.get("slice_config") or {}).get(
        "max_slice_nums", 9)))
    upsize = str(preprocessor.get("small_image_upsize", family.small_image_upsize[0]))
    if upsize not in family.small_image_upsize:
        raise ConversionError(f"preprocessor_config.json's small_image_upsize {upsize!r} is none of {family.title}'s "
                              f"modes ({', '.join(family.small_image_upsize)})")

    markers = canvas_markers(family, top)

    def metadata(writer: GGUFWriter) -> None:
        writer.add_name(family.title)
        if markers:
            writer.add_array(CANVAS_KEY, markers)
            writer.add_description(CANVAS_DESCRIPTION)
        # What the runtime needs to lay out prompts as the family's official processor does.
        writer.add_string("minicpmv_edge.family", family.key)
        writer.add_bool("minicpmv_edge.use_image_id", use_image_id)
        writer.add_uint32("minicpmv_edge.max_slice_nums", max_slice_nums)
        if len(family.small_image_upsize) > 1:  # families whose processor can size small images another way
            writer.add_string("minicpmv_edge.small_image_upsize", upsize)
        write_common_metadata(writer, config)
        arch.extra_metadata(writer, config)
        writer.add_vocab_size(n_vocab)
        writer.add_file_type(preset.llm_ftype)
        if preset.llm_is_quantized:
            writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        write_vocab(writer, checkpoint.folder, family.tokenizer_pre, n_vocab)

    return GgufPlan(arch.gguf_arch, metadata, tensors)
