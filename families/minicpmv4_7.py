"""MiniCPM-V 4.7 (transformers' MiniCPMV4_7ForConditionalGeneration, `models/minicpmv4_7`): MiniCPM-V 4.6's
vision tower and token merger (clip.cpp's `minicpmv4_6` projector runs it while the window and merge kernels
are 2x2 and `merger_times` is 1; the converter refuses other values) in front of Qwen3.5 (llama.cpp's
`qwen35`), with **canvas M-RoPE** positions for the language model: an image's thumbnail and slices share one
2-D canvas (runtime/canvas_rope.py). The pinned llama.cpp cannot express them through token batches, so our
converter writes the GGUF for positions fed as embedding rows [sequence index, H, W, T] with rope sections
[0, s_h, s_w, s_t] (the `qwen35-canvas` LLM architecture) and marks it (`CANVAS_KEY`, holding the marker
token ids the positions are computed from); the runtime refuses a 4.7 language model without that mark.

The synthetic checkpoint is built like 4.6's (builder "minicpmv4_6": transformers' own class named by
`architectures` + save_pretrained). What is published and what is assumed: PUBLISHED.md ("MiniCPM-V 4.7")."""

from __future__ import annotations

from typing import Any

from . import minicpmv4_6  # noqa: F401  (registers the 4.6 spec this one derives from)
from .registry import MERGER_LAYOUT, Family, get, register
from .specs import CheckpointSpec
from .templates import QWEN3_THINKING_ON_TEMPLATE

ARCHITECTURE = "MiniCPMV4_7ForConditionalGeneration"
# Our converter's key on the language model: the marker token ids canvas positions are computed from, in
# transformers' order; present exactly when the file expects positions [sequence index, H, W, T].
CANVAS_KEY = "minicpmv_edge.canvas_mrope_markers"
# config.json keys of those markers (MiniCPMV4_7Config), in the order CANVAS_KEY stores them.
CANVAS_MARKERS = ("image_start_id", "image_end_id", "slice_start_id", "slice_end_id", "newline_id")

_V46 = get("minicpm-v-4.6").synthetic
assert _V46 is not None

# 4.7 keeps 4.6's image processor (transformers 5.23 ships no 4.7 one); downsample_mode moved to config.json.
_IMAGE_PROCESSOR: dict[str, Any] = {k: v for k, v in _V46.preprocessor_config.items()
                                    if k not in ("downsample_mode", "processor_class")}
_VIDEO_PROCESSOR: dict[str, Any] = {k: v for k, v in (_V46.processor_config or {})["video_processor"].items()
                                    if k != "downsample_mode"}
_TOKENS = {"image_start_id": "<image>", "image_end_id": "</image>", "slice_start_id": "<slice>",
           "slice_end_id": "</slice>", "newline_id": "Ċ"}   # Ċ: "\n" in the byte-level vocabulary
_CONFIG: dict[str, Any] = {
    **_V46.config, "architectures": [ARCHITECTURE],
    "text_config": {**_V46.config["text_config"], "tie_word_embeddings": False},
    "vision_config": {**_V46.config["vision_config"], "model_type": "minicpmv4_7_vision",
                      "window_kernel_size": [2, 2]},
    "tie_word_embeddings": False, "downsample_mode": "16x", "merge_kernel_size": [2, 2], "merger_times": 1,
    **{key: "$id:" + token for key, token in _TOKENS.items()},
}
_IDS = {"bos_token_id": "$id:<|endoftext|>", "eos_token_id": ["$id:<|im_end|>", "$id:<|endoftext|>"],
        "pad_token_id": "$id:<|endoftext|>"}

register(Family(
    "minicpm-v-4.7", "MiniCPM-V 4.7", ARCHITECTURE, "", "qwen35-canvas", "qwen35", "minicpmv4_6",
    layout=MERGER_LAYOUT, unversioned=True, gguf_llm_archs=("qwen35",), positions="canvas",
    foreign_projectors=("minicpmv4_7",),
    synthetic=CheckpointSpec(
        builder="minicpmv4_6", tokenizer="bpe-qwen35", full=dict(_V46.full),
        # head_dim 32: 4 rotary pairs (T, H, W, T), so the tiny model's positions exercise both canvas axes.
        tiny={**_V46.tiny, "head_dim": 32},
        config=_CONFIG,
        generation_config={**_IDS, "do_sample": True, "temperature": 0.6, "top_k": 20, "top_p": 0.95},
        preprocessor_config={**_IMAGE_PROCESSOR, "processor_class": "MiniCPMV4_7Processor"},
        processor_config={"image_processor": dict(_IMAGE_PROCESSOR), "processor_class": "MiniCPMV4_7Processor",
                          "video_processor": _VIDEO_PROCESSOR},
        added_tokens=_V46.added_tokens,
        # Thinking on unless enable_thinking is false (llama.cpp's 4.7 notes: "enables thinking by default").
        chat_template=QWEN3_THINKING_ON_TEMPLATE,
        tokenizer_config=dict(_V46.tokenizer_config),
    ),
))
