"""Plan of the mmproj GGUF: the SigLIP vision tower (`vpm.*`) and the resampler (`resampler.*`) under the
names and metadata llama.cpp's clip.cpp reads for PROJECTOR_TYPE_MINICPMV (tools/mtmd/clip-impl.h).
MiniCPM-V 4.6's token merger has its own planner (`merger`); the SigLIP body and its metadata are shared."""

from __future__ import annotations

from typing import Callable, Iterator

import gguf
import numpy as np
from gguf import GGUFWriter

from .checkpoint import Checkpoint
from .errors import ConversionError
from minicpmv_edge.families import Family
from .gguf_out import GgufPlan, PlannedTensor, SourcedTensor
from .hparams import require
from .presets import Preset, mmproj_tensor_type

# Published names gguf's TensorNameMap does not cover, each with how its GGUF tensors derive from it.
_POST_LAYERNORM = "vpm.post_layernorm."
_IN_PROJ = "resampler.attn.in_proj_"
_PROJ = "resampler.proj"
_POS_EMBED_K = "resampler.pos_embed_k"
# clip.cpp's MiniCPM-V graph fixes the ViT position table at a 70x70 bucket grid.
_POSITION_GRID = 70


def sincos_2d(embed_dim: int, grid: int) -> np.ndarray:
    """The resampler's 2D sin-cos table for a grid x grid patch grid ([grid*grid, embed_dim]); clip.cpp's
    loader requires the tensor even though its graph recomputes the embedding for each image size."""
    omega = 1.0 / 10000 ** (np.arange(embed_dim // 4, dtype=np.float64) / (embed_dim / 4))
    rows, cols = np.meshgrid(np.arange(grid, dtype=np.float64), np.arange(grid, dtype=np.float64), indexing="ij")

    def one_axis(pos: np.ndarray) -> np.ndarray:
        angles = pos.reshape(-1)[:, None] * omega[None, :]
        return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)

    return np.concatenate([one_axis(cols), one_axis(rows)], axis=1).astype(np.float32)


def reader(checkpoint: Checkpoint, name: str, fn: Callable[[np.ndarray], np.ndarray] = lambda a: a
           ) -> Callable[[], Iterator[np.ndarray]]:
    return lambda: iter([fn(checkpoint.read(name))])


def siglip_tensor(checkpoint: Checkpoint, name_map: gguf.TensorNameMap, hf_name: str,
                  siglip_name: str) -> SourcedTensor:
    """A tensor of the SigLIP body, named as the resampler families publish it (`vpm.*`)."""
    ref = checkpoint.tensors[hf_name]
    if siglip_name.startswith(_POST_LAYERNORM):
        return "v.post_ln." + siglip_name.rsplit(".", 1)[1], ref.shape, reader(checkpoint, hf_name)
    gguf_name = name_map.get_name(siglip_name, try_suffixes=(".weight", ".bias"))
    if gguf_name is None:
        raise ConversionError(f"no clip.cpp tensor for {hf_name}")
    return gguf_name, ref.shape, reader(checkpoint, hf_name)


def siglip_name_map(vision: dict) -> gguf.TensorNameMap:
    return gguf.get_tensor_name_map(gguf.MODEL_ARCH.MMPROJ, int(require(vision, "num_hidden_layers")))


def _source_tensors(checkpoint: Checkpoint, family: Family) -> list[SourcedTensor]:
    config = checkpoint.config
    name_map = siglip_name_map(require(config, "vision_config"))
    embed_dim = int(require(config, "hidden_size"))
    # llama.cpp's minicpm arch multiplies every input embedding by scale_emb, injected image embeddings
    # included, where the HF model scales only text embeddings: pre-divide the projector.
    proj_scale = 1.0 / float(config["scale_emb"]) if "scale_emb" in config else 1.0
    out: list[SourcedTensor] = []

    def read(name: str, fn: Callable[[np.ndarray], np.ndarray] = lambda a: a) -> Callable[[], Iterator[np.ndarray]]:
        return reader(checkpoint, name, fn)

    for hf_name, ref in checkpoint.tensors.items():
        if not hf_name.startswith(family.layout.vision_prefixes):
            continue
        if hf_name.startswith(_IN_PROJ):
            suffix = hf_name.rsplit("_", 1)[1]  # weight | bias
            for i, part in enumerate("qkv"):
                rows = ref.shape[0] // 3
                out.append((f"resampler.attn.{part}.{suffix}", (rows, *ref.shape[1:]),
                            read(hf_name, lambda a, i=i, rows=rows: a[i * rows:(i + 1) * rows])))
        elif hf_name == _PROJ:
            out.append(("resampler.proj.weight", ref.shape[::-1],
                        read(hf_name, lambda a: np.ascontiguousarray(a.T) * np.float32(proj_scale))))
        else:
            out.append(siglip_tensor(checkpoint, name_map, hf_name, hf_name))
    pos_embed = sincos_2d(embed_dim, _POSITION_GRID)
    out.append((_POS_EMBED_K, pos_embed.shape, lambda: iter([pos_embed])))
    return out


def planned(named: list[SourcedTensor], required: set[str], preset: Preset) -> list[PlannedTensor]:
    missing = required - {name for name, _, _ in named}
    if missing:
        raise ConversionError(f"the checkpoint lacks vision tensors: {', '.join(sorted(missing))}")
    return [PlannedTensor(name, tuple(shape), mmproj_tensor_type(name, shape, preset), source)
            for name, shape, source in named]


def write_vision_metadata(writer: GGUFWriter, family: Family, preset: Preset, vision: dict, image_size: int,
                          projection_dim: int, preprocessor: dict) -> None:
    """What clip.cpp reads of the SigLIP tower in every MiniCPM-V projector."""
    writer.add_name(f"{family.title} vision encoder")
    writer.add_description("image encoder for MiniCPM-V")
    writer.add_file_type(0 if preset.mmproj_type == gguf.GGMLQuantizationType.F32 else 1)
    writer.add_clip_has_vision_encoder(True)
    # clip.cpp slices and warms up at this size (the published 4.6 vision config says 980, the size of
    # its position-bucket grid, not of a slice).
    writer.add_vision_image_size(image_size)
    writer.add_vision_patch_size(int(require(vision, "patch_size")))
    writer.add_vision_embedding_length(int(require(vision, "hidden_size")))
    writer.add_vision_feed_forward_length(int(require(vision, "intermediate_size")))
    writer.add_vision_head_count(int(require(vision, "num_attention_heads")))
    writer.add_vision_block_count(int(require(vision, "num_hidden_layers")))
    writer.add_vision_projection_dim(projection_dim)
    writer.add_vision_attention_layernorm_eps(float(vision.get("layer_norm_eps", 1e-6)))
    writer.add_vision_image_mean(list(map(float, preprocessor.get("norm_mean", preprocessor.get(
        "image_mean", [0.5, 0.5, 0.5])))))
    writer.add_vision_image_std(list(map(float, preprocessor.get("norm_std", preprocessor.get(
        "image_std", [0.5, 0.5, 0.5])))))
    writer.add_vision_use_gelu(True)


def plan_resampler_mmproj(checkpoint: Checkpoint, family: Family, preset: Preset) -> GgufPlan:
    config = checkpoint.config
    vision = require(config, "vision_config")
    preprocessor = checkpoint.json_file("preprocessor_config.json") or {}
    slice_config = config.get("slice_config") or {}
    tensors = planned(_source_tensors(checkpoint, family),
                      {"resampler.query", "resampler.kv.weight", "resampler.proj.weight", "v.patch_embd.weight"},
                      preset)

    def metadata(writer: GGUFWriter) -> None:
        write_vision_metadata(writer, family, preset, vision,
                              int(slice_config.get("scale_resolution", require(config, "image_size"))),
                              int(require(config, "hidden_size")), preprocessor)
        writer.add_clip_projector_type("resampler")
        writer.add_int32("clip.minicpmv_version", family.minicpmv_version)
        writer.add_uint32("clip.minicpmv_query_num", int(require(config, "query_num")))

    return GgufPlan("clip", metadata, tensors)
