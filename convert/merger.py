"""Plan of MiniCPM-V 4.6's mmproj: the SigLIP body, the window-attention merger inserted after one ViT layer
(`vit_merger`), and the final downsampling MLP (`merger`), under the names and metadata clip.cpp reads for
PROJECTOR_TYPE_MINICPMV4_6 (tools/mtmd/clip.cpp, models/minicpmv.cpp).

The downsample mode is fixed when the file is written: "16x" merges 2x2 tokens twice (the ViT merger, then
the final MLP), "4x" skips the ViT merger, so its tensors are left out and four times as many image
tokens reach the language model.
"""

from __future__ import annotations

from gguf import GGUFWriter

from .checkpoint import Checkpoint
from .errors import ConversionError
from minicpmv_edge.families import Family

from .families import llm_config
from .gguf_out import GgufPlan, SourcedTensor
from .hparams import require
from .mmproj import planned, reader, siglip_name_map, siglip_tensor, write_vision_metadata
from .presets import Preset

DOWNSAMPLE_MODES = {"16x": 4, "4x": 2}  # mode -> clip.vision.projector.scale_factor (patches merged per side)
_BODY = "model.vision_tower."
_VIT_MERGER = "model.vision_tower.vit_merger."
# Names gguf-py on PyPI does not know yet (llama.cpp's own gguf-py maps them, tensor_mapping.py).
_MERGER_NAMES = {
    "model.vision_tower.vit_merger.layer_norm1": "v.vit_merger.ln1",
    "model.vision_tower.vit_merger.self_attn.q_proj": "v.vit_merger.attn_q",
    "model.vision_tower.vit_merger.self_attn.k_proj": "v.vit_merger.attn_k",
    "model.vision_tower.vit_merger.self_attn.v_proj": "v.vit_merger.attn_v",
    "model.vision_tower.vit_merger.self_attn.out_proj": "v.vit_merger.attn_out",
    "model.vision_tower.vit_merger.pre_norm": "v.vit_merger.ds_ln",
    "model.vision_tower.vit_merger.linear_1": "v.vit_merger.ds_ffn_up",
    "model.vision_tower.vit_merger.linear_2": "v.vit_merger.ds_ffn_down",
    "model.merger.mlp.0.pre_norm": "mm.input_norm",
    "model.merger.mlp.0.linear_1": "mm.up",
    "model.merger.mlp.0.linear_2": "mm.down",
}
_REQUIRED = {"v.patch_embd.weight", "v.position_embd.weight", "mm.up.weight", "mm.down.weight"}
_REQUIRED_16X = {"v.vit_merger.attn_q.weight", "v.vit_merger.ds_ffn_up.weight"}


def downsample_mode_of(checkpoint: Checkpoint, requested: str | None) -> str:
    preprocessor = checkpoint.json_file("preprocessor_config.json") or {}
    mode = requested or preprocessor.get("downsample_mode") or checkpoint.config.get("downsample_mode") or "16x"
    if mode not in DOWNSAMPLE_MODES:
        raise ConversionError(f"downsample mode must be one of {', '.join(DOWNSAMPLE_MODES)}, not {mode!r}")
    return mode


def _source_tensors(checkpoint: Checkpoint, vision: dict, keep_vit_merger: bool) -> list[SourcedTensor]:
    name_map = siglip_name_map(vision)
    out: list[SourcedTensor] = []
    for hf_name, ref in checkpoint.tensors.items():
        stem, _, suffix = hf_name.rpartition(".")
        if stem in _MERGER_NAMES:
            if keep_vit_merger or not hf_name.startswith(_VIT_MERGER):
                out.append((f"{_MERGER_NAMES[stem]}.{suffix}", ref.shape, reader(checkpoint, hf_name)))
        elif hf_name.startswith(_BODY):
            # The SigLIP body carries the resampler families' names under another prefix.
            out.append(siglip_tensor(checkpoint, name_map, hf_name, "vpm." + hf_name[len(_BODY):]))
        elif hf_name.startswith("model.merger."):
            raise ConversionError(f"no clip.cpp tensor for {hf_name}")
    return out


def check_kernels(config: dict, vision: dict) -> None:
    """clip.cpp's minicpmv4_6 graph hard-codes 2x2 window and merge kernels and one merge round (MiniCPM-V
    4.7's config names them; 4.6's has these values built in)."""
    for where, key in ((vision, "window_kernel_size"), (config, "merge_kernel_size")):
        if list(where.get(key, [2, 2])) != [2, 2]:
            raise ConversionError(f"config.json's {key} {where[key]} is not 2x2, the only kernel clip.cpp's "
                                  f"MiniCPM-V merger runs")
    if config.get("merger_times", 1) != 1:
        raise ConversionError(f"config.json's merger_times {config['merger_times']} is not 1, the only number of "
                              f"merge rounds clip.cpp's MiniCPM-V merger runs")


def plan_merger_mmproj(checkpoint: Checkpoint, family: Family, preset: Preset, mode: str) -> GgufPlan:
    """`mode`: a key of DOWNSAMPLE_MODES, as `downsample_mode_of` resolves it."""
    config = checkpoint.config
    vision = require(config, "vision_config")
    check_kernels(config, vision)
    preprocessor = checkpoint.json_file("preprocessor_config.json") or {}
    n_layer = int(require(vision, "num_hidden_layers"))
    insert_layer = int(config.get("insert_layer_id", vision.get("insert_layer_id", 6)))
    if not 0 <= insert_layer < n_layer:
        raise ConversionError(f"insert_layer_id {insert_layer} is outside the {n_layer} vision layers")
    tensors = planned(_source_tensors(checkpoint, vision, keep_vit_merger=mode == "16x"),
                      _REQUIRED | (_REQUIRED_16X if mode == "16x" else set()), preset)
    llm_width = int(require(llm_config(family, config), "hidden_size"))

    def metadata(writer: GGUFWriter) -> None:
        write_vision_metadata(writer, family, preset, vision,
                              int(preprocessor.get("scale_resolution", config.get("image_size", 448))),
                              llm_width, preprocessor)
        writer.add_clip_projector_type("minicpmv4_6")
        writer.add_vision_projector_scale_factor(DOWNSAMPLE_MODES[mode])
        # clip.cpp reads the merger's insertion layer from the window-attention layer list.
        writer.add_vision_wa_layer_indexes([insert_layer])

    return GgufPlan("clip", metadata, tensors)
