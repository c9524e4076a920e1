"""MiniCPM-OCR 1.0 (transformers' MiniCPMOcrForConditionalGeneration, `models/minicpm_ocr`): MiniCPM-V 4.6's
model classes unchanged (empty subclasses: Qwen3.5 behind the SigLIP tower and token merger, llama.cpp's
`qwen35` + `clip.projector_type` minicpmv4_6), with other published defaults: tied embeddings, the 4x
downsample mode, and an image processor whose `small_image_upsize` may keep small images at their native size
("never") or decide from their glyphs ("adaptive", OpenCV). llama.cpp knows no such family: its mmproj is a 4.6
projector, so a pair is told apart only by our converter's `minicpmv_edge.family` key (without it, it reads as
4.6, whose registry entry is first for that projector).

The synthetic checkpoint is the 4.6 spec with the OCR class and config: the same builder ("minicpmv4_6",
transformers' own class named by `architectures`, + save_pretrained), tokenizer and sizes. What is published
and what is assumed: PUBLISHED.md beside this file ("MiniCPM-OCR 1.0")."""

from __future__ import annotations

import dataclasses
from typing import Any

from . import minicpmv4_6  # noqa: F401  (registers the 4.6 spec this one derives from)
from .registry import MERGER_LAYOUT, UPSIZE_MODES, Family, get, register

ARCHITECTURE = "MiniCPMOcrForConditionalGeneration"
_V46 = get("minicpm-v-4.6").synthetic
assert _V46 is not None

# MiniCPMOcrImageProcessor's class defaults: 4.6's, but downsample_mode 4x and small_image_upsize "always".
_IMAGE_PROCESSOR: dict[str, Any] = {
    **_V46.preprocessor_config, "downsample_mode": "4x", "image_processor_type": "MiniCPMOcrImageProcessor",
    "processor_class": "MiniCPMOcrProcessor", "small_image_upsize": "always",
}
_VIDEO_PROCESSOR: dict[str, Any] = {
    **(_V46.processor_config or {})["video_processor"], "downsample_mode": "4x",
    "video_processor_type": "MiniCPMOcrVideoProcessor",
}
_CONFIG: dict[str, Any] = {
    **_V46.config, "architectures": [ARCHITECTURE], "downsample_mode": "4x",
    "vision_config": {**_V46.config["vision_config"], "model_type": "minicpm_ocr_vision"},
}

register(Family(
    "minicpm-ocr-1.0", "MiniCPM-OCR 1.0", ARCHITECTURE, "", "qwen35", "qwen35", "minicpmv4_6",
    layout=MERGER_LAYOUT, unversioned=True, small_image_upsize=UPSIZE_MODES,
    synthetic=dataclasses.replace(
        _V46, config=_CONFIG,
        preprocessor_config=_IMAGE_PROCESSOR,
        processor_config={"image_processor": {k: v for k, v in _IMAGE_PROCESSOR.items() if k != "processor_class"},
                          "processor_class": "MiniCPMOcrProcessor", "video_processor": _VIDEO_PROCESSOR},
        variants={},
    ),
))
