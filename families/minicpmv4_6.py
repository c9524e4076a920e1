"""MiniCPM-V 4.6 and 4.6-Thinking (transformers' MiniCPMV4_6ForConditionalGeneration): Qwen3.5-0.8B
(llama.cpp's `qwen35`, linear + full attention) behind a SigLIP tower whose token merger replaces the
resampler (`clip.projector_type` minicpmv4_6). Both variants share weights layout and config; only their
chat templates differ, and the GGUF carries the template.

The synthetic checkpoint is built by transformers' own class (`builder="minicpmv4_6"`): `config` below is
the keyword arguments of `MiniCPMV4_6Config` in the published layout; 4.6-Thinking is a synthetic variant of
this family (`variants`). Sources and confidence: PUBLISHED.md beside this file ("MiniCPM-V 4.6")."""

from __future__ import annotations

from typing import Any

from .registry import MERGER_LAYOUT, Family, register
from .specs import CheckpointSpec
from .templates import QWEN3_THINKING_ON_TEMPLATE, QWEN3_THINKING_TEMPLATE
from .tokens import QWEN3_BASE

MINICPM_IMAGE_TOKENS = ("<image>", "</image>", "<slice>", "</slice>", "<image_id>", "</image_id>")
# Named tokens `MiniCPMV4_6Processor.__init__` reads from the tokenizer (tokenizer_config extra_special_tokens).
NAMED_TOKENS: dict[str, str] = {
    "image_token": "<|image_pad|>", "video_token": "<|video_pad|>",
    "image_start_token": "<image>", "image_end_token": "</image>",
    "slice_start_token": "<slice>", "slice_end_token": "</slice>",
    "image_id_start_token": "<image_id>", "image_id_end_token": "</image_id>",
}

_IMAGE_PROCESSOR: dict[str, Any] = {
    "do_convert_rgb": True, "do_normalize": True, "do_rescale": True, "do_resize": True,
    "downsample_mode": "16x", "image_mean": [0.5, 0.5, 0.5], "image_processor_type": "MiniCPMV4_6ImageProcessor",
    "image_std": [0.5, 0.5, 0.5], "max_slice_nums": 9, "patch_size": 14, "resample": 3,
    "rescale_factor": 0.00392156862745098, "scale_resolution": 448, "slice_mode": True, "use_image_id": True,
}
_VIDEO_PROCESSOR: dict[str, Any] = {
    "do_convert_rgb": True, "do_normalize": True, "do_rescale": True, "do_resize": True,
    "do_sample_frames": True, "downsample_mode": "16x", "image_mean": [0.5, 0.5, 0.5],
    "image_std": [0.5, 0.5, 0.5], "max_num_frames": 128, "max_slice_nums": 9, "patch_size": 14,
    "resample": 3, "rescale_factor": 0.00392156862745098, "scale_resolution": 448, "slice_mode": True,
    "stack_frames": 1, "use_image_id": True, "video_processor_type": "MiniCPMV4_6VideoProcessor",
}
_SAMPLING = {"do_sample": True, "temperature": 0.6, "top_k": 20, "top_p": 0.95}
_IDS = {"bos_token_id": "$id:<|endoftext|>", "eos_token_id": ["$id:<|im_end|>", "$id:<|endoftext|>"],
        "pad_token_id": "$id:<|endoftext|>"}

register(Family(
    "minicpm-v-4.6", "MiniCPM-V 4.6", "MiniCPMV4_6ForConditionalGeneration", "", "qwen35", "qwen35",
    "minicpmv4_6", layout=MERGER_LAYOUT, unversioned=True, video="frames",
    synthetic=CheckpointSpec(
        builder="minicpmv4_6", tokenizer="bpe-qwen35",
        # "$layer_types": `layers` entries, every `full_attention_interval`-th one full attention.
        full=dict(vocab=248094, hidden=1024, intermediate=3584, layers=24, heads=8, kv_heads=2, head_dim=256,
                  lin_k_dim=128, lin_v_dim=128, lin_k_heads=16, lin_v_heads=16, full_attention_interval=4,
                  v_hidden=1152, v_intermediate=4304, v_layers=27, v_heads=16, insert_layer_id=6),
        tiny=dict(
            hidden=64, intermediate=128, layers=4, heads=4, kv_heads=2, head_dim=16,
            # linear_num_key_heads != linear_num_value_heads on purpose: exercises the V-head reordering path.
            lin_k_dim=16, lin_v_dim=16, lin_k_heads=2, lin_v_heads=4, full_attention_interval=4,
            # image_size stays 980 (70x70 position grid llama.cpp buckets on); insert_layer_id < v_layers.
            v_hidden=64, v_intermediate=128, v_layers=3, v_heads=2, insert_layer_id=1,
        ),
        config={
            "architectures": ["MiniCPMV4_6ForConditionalGeneration"],
            "text_config": {
                "model_type": "qwen3_5_text", "attention_bias": False, "attn_output_gate": True,
                "full_attention_interval": "$full_attention_interval", "head_dim": "$head_dim",
                "hidden_size": "$hidden", "intermediate_size": "$intermediate", "layer_types": "$layer_types",
                "linear_conv_kernel_dim": 4, "linear_key_head_dim": "$lin_k_dim",
                "linear_num_key_heads": "$lin_k_heads", "linear_num_value_heads": "$lin_v_heads",
                "linear_value_head_dim": "$lin_v_dim", "max_position_embeddings": 262144,
                "mtp_num_hidden_layers": 1, "mtp_use_dedicated_embeddings": False,
                "num_attention_heads": "$heads", "num_hidden_layers": "$layers", "num_key_value_heads": "$kv_heads",
                "rms_norm_eps": 1e-06,
                "rope_parameters": {"partial_rotary_factor": 0.25, "rope_theta": 10000000, "rope_type": "default"},
                "tie_word_embeddings": True, "vocab_size": "$vocab",
            },
            "vision_config": {
                "model_type": "minicpmv4_6_vision", "hidden_size": "$v_hidden", "intermediate_size": "$v_intermediate",
                "num_hidden_layers": "$v_layers", "num_attention_heads": "$v_heads", "patch_size": 14,
                "image_size": 980, "insert_layer_id": "$insert_layer_id",
            },
            "insert_layer_id": "$insert_layer_id", "image_token_id": "$id:" + NAMED_TOKENS["image_token"],
            "video_token_id": "$id:" + NAMED_TOKENS["video_token"], "tie_word_embeddings": True,
        },
        generation_config={**_IDS, **_SAMPLING, "chat_template_kwargs": {"enable_thinking": False}},
        preprocessor_config={**_IMAGE_PROCESSOR, "processor_class": "MiniCPMV4_6Processor"},
        processor_config={"image_processor": dict(_IMAGE_PROCESSOR), "processor_class": "MiniCPMV4_6Processor",
                          "video_processor": dict(_VIDEO_PROCESSOR)},
        # Qwen3 specials (so <|image_pad|> sits 12 after <|endoftext|>, as 248056 = 248044 + 12 in the
        # published vocab), MiniCPM-V image tags, <unk>.
        added_tokens=QWEN3_BASE + tuple((t, True) for t in MINICPM_IMAGE_TOKENS) + (("<unk>", True),),
        chat_template=QWEN3_THINKING_TEMPLATE,
        tokenizer_config={
            "add_prefix_space": False, "backend": "tokenizers", "bos_token": None,
            "clean_up_tokenization_spaces": False, "eos_token": "<|im_end|>", "errors": "replace",
            "extra_special_tokens": dict(NAMED_TOKENS), "model_max_length": 262144,
            "pad_token": "<|endoftext|>", "split_special_tokens": False, "tokenizer_class": "TokenizersBackend",
            "unk_token": "<unk>",
        },
        # 4.6-Thinking (assumed, PUBLISHED.md): opens a <think> block unless enable_thinking is false.
        variants={"minicpm-v-4.6-thinking": {"chat_template": QWEN3_THINKING_ON_TEMPLATE,
                                             "generation_config": {**_IDS, **_SAMPLING}}},
    ),
))
