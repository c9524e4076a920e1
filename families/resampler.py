"""The families whose vision tower ends in the perceiver resampler (a fixed number of query tokens per
piece): MiniCPM-Llama3-V 2.5, MiniCPM-V 2.6 / 4.0 / 4.5 and MiniCPM-o 2.6 / 4.5. Their checkpoints share
one layout (`llm.`, `vpm.`, `resampler.`); clip.cpp tells them apart by `clip.minicpmv_version`
(tools/mtmd/clip.cpp, mtmd.cpp in the pinned llama.cpp).

Each family also carries its synthetic checkpoint (`CheckpointSpec`: the published config.json,
generation_config.json, preprocessor_config.json and tokenizer files as templates, with the published full
sizes) and the hints of its torch reference in the tests (`ReferenceHints`). Sources and confidence of every
value: PUBLISHED.md beside this file."""

from __future__ import annotations

from typing import Any

from .registry import Family, PieceFrame, register
from .specs import CheckpointSpec, ReferenceHints
from .templates import CHATML_TEMPLATE, LLAMA3_TEMPLATE, QWEN2_TEMPLATE, QWEN3_THINKING_TEMPLATE
from .tokens import (AUDIO_TOKENS, IMAGE_ID_TAGS, IMAGE_TAGS, LLAMA3_BASE, MINICPM4_CHATML, QWEN2_BASE, QWEN3_BASE,
                     QWEN25_BASE, UNIT_TAGS, special)

# MiniCPM-o's audio encoder and speech decoder: not part of a vision + text model.
OMNI_SKIP = ("apm.", "tts.", "audio_projection_layer.", "audio_avg_pooler.")

# --- synthetic checkpoints: sizes and shared config parts ----------------------------------------

# Tiny keeps llama.cpp's hard-coded invariants: LLM hidden % 128 == 0 (resampler head size 128)
# and the 980 px / 14 px vision grid (70x70 position table); everything else shrinks. Each family's
# `tiny` is a copy (with its quirks), so a test can change one family's tiny size alone.
_TINY: dict[str, int] = dict(
    hidden=256, intermediate=512, layers=4, heads=4, kv_heads=2, head_dim=64,
    v_hidden=128, v_intermediate=256, v_layers=2, v_heads=2,
    a_dmodel=64, a_ffn=128, a_layers=1, a_heads=2,
    tts_hidden=64, tts_intermediate=128, tts_layers=1, tts_heads=2, tts_text_vocab=96, tts_audio_vocab=80,
)
SIGLIP_400M = dict(v_hidden=1152, v_intermediate=4304, v_layers=27, v_heads=16)
WHISPER_MEDIUM = dict(a_dmodel=1024, a_ffn=4096, a_layers=24, a_heads=16)


def _tiny(**quirks: int) -> dict[str, int]:
    return {**_TINY, **quirks}


_AUTO_MAP_V = {
    "AutoConfig": "configuration_minicpm.MiniCPMVConfig",
    "AutoModel": "modeling_minicpmv.MiniCPMV",
    "AutoModelForCausalLM": "modeling_minicpmv.MiniCPMV",
}
_AUTO_MAP_O = {
    "AutoConfig": "configuration_minicpm.MiniCPMOConfig",
    "AutoModel": "modeling_minicpmo.MiniCPMO",
    "AutoModelForCausalLM": "modeling_minicpmo.MiniCPMO",
}
_VISION_CONFIG = {
    "hidden_size": "$v_hidden", "image_size": 980, "intermediate_size": "$v_intermediate",
    "model_type": "siglip", "num_attention_heads": "$v_heads", "num_hidden_layers": "$v_layers",
    "patch_size": 14,
}
_SLICE = {"max_slice_nums": 9, "patch_size": 14, "model_type": "minicpmv"}
_WHISPER_CONFIG = {
    "model_type": "whisper", "d_model": "$a_dmodel", "encoder_layers": "$a_layers",
    "encoder_attention_heads": "$a_heads", "encoder_ffn_dim": "$a_ffn", "decoder_layers": "$a_layers",
    "decoder_attention_heads": "$a_heads", "decoder_ffn_dim": "$a_ffn", "num_mel_bins": 80,
    "max_source_positions": 1500, "activation_function": "gelu",
}


def _qwen_llm(rope_theta: float, max_pos: int, sliding: int | None, head_dim: bool) -> dict[str, Any]:
    # Qwen3 configs carry attention_bias / head_dim / rope_scaling, Qwen2 ones do not.
    d: dict[str, Any] = {"attention_bias": False} if head_dim else {}
    d.update({"attention_dropout": 0.0, "bos_token_id": "$id:<|endoftext|>", "eos_token_id": "$id:<|im_end|>"})
    if head_dim:
        d["head_dim"] = "$head_dim"
    d.update({
        "hidden_act": "silu", "hidden_size": "$hidden", "initializer_range": 0.02,
        "intermediate_size": "$intermediate", "max_position_embeddings": max_pos,
        "max_window_layers": "$layers", "num_attention_heads": "$heads", "num_hidden_layers": "$layers",
        "num_key_value_heads": "$kv_heads", "rms_norm_eps": 1e-06,
        **({"rope_scaling": None} if head_dim else {}), "rope_theta": rope_theta, "sliding_window": sliding,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16", "transformers_version": "4.51.0", "use_cache": True,
        "use_sliding_window": False, "vocab_size": "$vocab",
    })
    return d


def _vision_tail(query_num: int, model_type: str = "minicpmv", **extra: Any) -> dict[str, Any]:
    return {
        "batch_vision_input": True, **extra, "drop_vision_last_layer": False, "image_size": 448,
        "model_type": model_type, "patch_size": 14, "query_num": query_num, "slice_config": dict(_SLICE),
        "slice_mode": True, "vision_config": dict(_VISION_CONFIG),
    }


def _preprocessor(query_num: int, version: float | None, omni: bool = False) -> dict[str, Any]:
    d: dict[str, Any] = {
        "image_processor_type": "MiniCPMVImageProcessor",
        "auto_map": {
            "AutoProcessor": "processing_minicpmo.MiniCPMOProcessor" if omni else "processing_minicpmv.MiniCPMVProcessor",
            "AutoImageProcessor": "image_processing_minicpmv.MiniCPMVImageProcessor",
        },
        "processor_class": "MiniCPMOProcessor" if omni else "MiniCPMVProcessor",
        "max_slice_nums": 9, "scale_resolution": 448, "patch_size": 14, "image_feature_size": query_num,
        "im_start": "<image>", "im_end": "</image>", "slice_start": "<slice>", "slice_end": "</slice>",
        "unk": "<unk>", "norm_mean": [0.5, 0.5, 0.5], "norm_std": [0.5, 0.5, 0.5],
    }
    if version is not None:  # 2.5 predates image ids (its processor has no <image_id> tags)
        d.update({"use_image_id": True, "im_id_start": "<image_id>", "im_id_end": "</image_id>",
                  "slice_mode": True, "version": version})
    return d


def _qwen_tok_config(max_len: int) -> dict[str, Any]:
    return {"add_bos_token": False, "add_prefix_space": False, "bos_token": "<|im_start|>",
            "clean_up_tokenization_spaces": False, "eos_token": "<|im_end|>",
            "errors": "replace", "extra_special_tokens": {}, "model_max_length": max_len,
            "pad_token": "<|endoftext|>", "split_special_tokens": False, "unk_token": "<unk>"}


# Published MiniCPM-V 4.0 longrope factors (64 = head_dim / 2 entries); tiny models resample them.
_V4_LONGROPE = (
    0.9977997200264581, 1.014658295992452, 1.0349680404997148, 1.059429246056193, 1.0888815016813513,
    1.1243301355211495, 1.166977103606075, 1.2182568066927284, 1.2798772354275727, 1.3538666751582975,
    1.4426259039919596, 1.5489853358570191, 1.6762658237220625, 1.8283407612492941, 2.0096956085876183,
    2.225478927469756, 2.481536379650452, 2.784415934557119, 3.1413289096347365, 3.560047844772632,
    4.048719380066383, 4.615569542115128, 5.2684819496549835, 6.014438591970396, 6.858830049237097,
    7.804668263503327, 8.851768731513417, 9.99600492938444, 11.228766118181639, 12.536757560834843,
    13.902257701387796, 15.303885189125953, 16.717837610115794, 18.119465097853947, 19.484965238406907,
    20.792956681060105, 22.02571786985731, 23.16995406772833, 24.217054535738416, 25.16289275000465,
    26.007284207271347, 26.753240849586767, 27.40615325712662, 27.973003419175363, 28.461674954469114,
    28.880393889607006, 29.237306864684626, 29.540186419591297, 29.79624387177199, 30.01202719065413,
    30.193382037992453, 30.34545697551969, 30.47273746338473, 30.579096895249787, 30.66785612408345,
    30.741845563814174, 30.80346599254902, 30.85474569563567, 30.897392663720595, 30.932841297560394,
    30.962293553185553, 30.986754758742034, 31.007064503249293, 31.02392307921529,
)

_S = True
_QWEN3_TOKENS = (QWEN3_BASE + special(IMAGE_TAGS, IMAGE_ID_TAGS, UNIT_TAGS,
                                      tuple(f"<|reserved_{i}|>" for i in range(63))) + (("<unk>", _S),))

# --- the families ------------------------------------------------------------------------------

# The byte-level BPE releases ship these beside tokenizer.json (MiniCPM4 ships a sentencepiece model instead).
BPE_TOKENIZER_FILES = ("vocab.json", "merges.txt", "added_tokens.json")

# 2.5's processor writes no image ids and wraps the slices in <slice> ... </slice>, each in <image>.
register(Family(
    "minicpm-llama3-v-2.5", "MiniCPM-Llama3-V 2.5", "MiniCPMV", "2.5", "llama", "llama-bpe", "resampler", 2,
    use_image_id=False, frame=PieceFrame(piece=("<image>", "</image>"), slices=("<slice>", "</slice>")),
    unversioned=True,
    synthetic=CheckpointSpec(
        builder="resampler", llm="llama", tokenizer="bpe-llama3", query_num=96,
        full=dict(vocab=128256, hidden=4096, intermediate=14336, layers=32, heads=32, kv_heads=8, **SIGLIP_400M),
        tiny=_tiny(),
        config={
            "_name_or_path": "openbmb/MiniCPM-Llama3-V-2_5", "architectures": ["MiniCPMV"],
            "attention_bias": False, "attention_dropout": 0.0, "auto_map": _AUTO_MAP_V,
            "batch_vision_input": True, "bos_token_id": "$id:<|begin_of_text|>",
            "drop_vision_last_layer": False, "eos_token_id": "$id:<|end_of_text|>", "hidden_act": "silu",
            "hidden_size": "$hidden", "image_size": 448, "initializer_range": 0.02,
            "intermediate_size": "$intermediate", "max_position_embeddings": 8192, "mlp_bias": False,
            "model_type": "minicpmv", "num_attention_heads": "$heads", "num_hidden_layers": "$layers",
            "num_key_value_heads": "$kv_heads", "patch_size": 14, "pretraining_tp": 1, "query_num": 96,
            "rms_norm_eps": 1e-05, "rope_scaling": None, "rope_theta": 500000.0,
            "slice_config": {**_SLICE, "scale_resolution": 448}, "slice_mode": True,
            "tie_word_embeddings": False, "torch_dtype": "bfloat16", "transformers_version": "4.40.0",
            "use_cache": True, "vision_config": {**_VISION_CONFIG, "model_type": "idefics2"},
            "vocab_size": "$vocab",
        },
        generation_config={"_from_model_config": True, "bos_token_id": "$id:<|begin_of_text|>",
                           "eos_token_id": "$id:<|end_of_text|>", "transformers_version": "4.40.0"},
        preprocessor_config=_preprocessor(96, None),
        added_tokens=LLAMA3_BASE + (("<unk>", _S),) + special(IMAGE_TAGS),
        chat_template=LLAMA3_TEMPLATE,
        tokenizer_config={"bos_token": "<|begin_of_text|>", "clean_up_tokenization_spaces": True,
                          "eos_token": "<|end_of_text|>", "model_input_names": ["input_ids", "attention_mask"],
                          "model_max_length": 1000000000000000019884624838656, "pad_token": "!",
                          "unk_token": "<unk>"},
        published_tokenizer_class="MiniCPMVTokenizerFast",
        special_map_keys=("bos_token", "eos_token", "pad_token", "unk_token"),
    ),
    reference=ReferenceHints("llama", "flat", "2d", "hub MiniCPM-Llama3-V-2_5 modeling_minicpmv.py"),
))
register(Family(
    "minicpm-v-2.6", "MiniCPM-V 2.6", "MiniCPMV", "2.6", "qwen2", "qwen2", "resampler", 3,
    synthetic=CheckpointSpec(
        builder="resampler", llm="qwen2", tokenizer="bpe-qwen2", query_num=64,
        full=dict(vocab=151666, hidden=3584, intermediate=18944, layers=28, heads=28, kv_heads=4, **SIGLIP_400M),
        tiny=_tiny(),
        config={"_name_or_path": "openbmb/MiniCPM-V-2_6", "version": 2.6, "architectures": ["MiniCPMV"],
                "auto_map": _AUTO_MAP_V, **_qwen_llm(1000000.0, 32768, 131072, head_dim=False),
                **_vision_tail(64, use_image_id=True, vision_batch_size=16)},
        generation_config={"_from_model_config": True, "bos_token_id": "$id:<|endoftext|>",
                           "eos_token_id": "$id:<|im_end|>", "transformers_version": "4.40.0"},
        preprocessor_config=_preprocessor(64, 2.6),
        added_tokens=QWEN2_BASE + special(IMAGE_TAGS, IMAGE_ID_TAGS,
                                          tuple(f"<|reserved_special_token_{i}|>" for i in range(6)))
        + (("<unk>", _S),),
        chat_template=QWEN2_TEMPLATE,
        tokenizer_config=_qwen_tok_config(32768),
        published_tokenizer_class="MiniCPMVTokenizerFast",
        tokenizer_files=BPE_TOKENIZER_FILES,
    ),
    reference=ReferenceHints("qwen2", "tgt", "2d", "hub MiniCPM-V-2_6 modeling_minicpmv.py"),
))
register(Family(
    "minicpm-o-2.6", "MiniCPM-o 2.6", "MiniCPMO", "2.6", "qwen2", "qwen2", "resampler", 4, skip_prefixes=OMNI_SKIP,
    synthetic=CheckpointSpec(
        builder="resampler", llm="qwen2", tokenizer="bpe-qwen2", query_num=64,
        full=dict(vocab=151700, hidden=3584, intermediate=18944, layers=28, heads=28, kv_heads=4,
                  **SIGLIP_400M, **WHISPER_MEDIUM, tts_hidden=768, tts_intermediate=3072, tts_layers=20,
                  tts_heads=12, tts_text_vocab=21178, tts_audio_vocab=626),
        tiny=_tiny(),
        config={"_name_or_path": "openbmb/MiniCPM-o-2_6", "version": 2.6, "architectures": ["MiniCPMO"],
                "auto_map": _AUTO_MAP_O, **_qwen_llm(1000000.0, 32768, 131072, head_dim=False),
                **_vision_tail(64, model_type="minicpmo", use_image_id=True, vision_batch_size=16),
                "audio_chunk_length": 1.0, "audio_config": _WHISPER_CONFIG, "audio_pool_step": 2,
                "init_audio": True, "init_tts": True, "init_vision": True, "stream_input": False,
                "listen_speak_type": "asr",
                "tts_config": {"model_type": "conditional_chattts", "llm_dim": "$hidden",
                               "hidden_size": "$tts_hidden", "intermediate_size": "$tts_intermediate",
                               "num_attention_heads": "$tts_heads", "num_hidden_layers": "$tts_layers",
                               "num_audio_tokens": "$tts_audio_vocab", "num_text_tokens": "$tts_text_vocab",
                               "num_vq": 4}},
        generation_config={"_from_model_config": True, "bos_token_id": "$id:<|endoftext|>",
                           "eos_token_id": "$id:<|im_end|>", "transformers_version": "4.44.2"},
        preprocessor_config=_preprocessor(64, 2.6, omni=True),
        added_tokens=QWEN25_BASE + special(IMAGE_TAGS, IMAGE_ID_TAGS, UNIT_TAGS, AUDIO_TOKENS) + (("<unk>", _S),),
        chat_template=QWEN2_TEMPLATE,
        tokenizer_config=_qwen_tok_config(131072),
        published_tokenizer_class="MiniCPMOTokenizerFast",
        tokenizer_files=BPE_TOKENIZER_FILES,
        audio=True, tts_layout="chattts",
    ),
    reference=ReferenceHints("qwen2", "tgt", "2d", "hub MiniCPM-o-2_6 modeling_minicpmo.py"),
))
# MiniCPM4-3B is published in Llama form (vLLM loads it with LlamaForCausalLM), with LongRoPE and a
# sentencepiece tokenizer ("default" pre-tokenizer); a MiniCPM-form config (scale_emb) becomes llama.cpp's
# minicpm architecture, which is what llama.cpp's own converter writes for it.
register(Family(
    "minicpm-v-4.0", "MiniCPM-V 4.0", "MiniCPMV", "4.0", "llama", "default", "resampler", 5,
    gguf_llm_archs=("llama", "minicpm"),
    synthetic=CheckpointSpec(
        builder="resampler", llm="llama", tokenizer="spm-llama", query_num=64,
        full=dict(vocab=73448, hidden=2560, intermediate=10240, layers=32, heads=32, kv_heads=2, head_dim=128,
                  **SIGLIP_400M),
        tiny=_tiny(head_dim=128),  # published: 32 heads x 128 on hidden 2560, so q_proj is not square
        config={
            "_name_or_path": "openbmb/MiniCPM-V-4", "version": 4.0, "architectures": ["MiniCPMV"],
            "auto_map": _AUTO_MAP_V, "attention_bias": False, "attention_dropout": 0.0,
            "bos_token_id": "$id:<s>", "eos_token_id": ["$id:</s>", "$id:<|im_end|>"], "pad_token_id": "$id:</s>",
            "head_dim": "$head_dim", "hidden_act": "silu", "hidden_size": "$hidden", "initializer_range": 0.02,
            "intermediate_size": "$intermediate", "max_position_embeddings": 32768, "mlp_bias": False,
            "num_attention_heads": "$heads", "num_hidden_layers": "$layers", "num_key_value_heads": "$kv_heads",
            "pretraining_tp": 1, "rms_norm_eps": 1e-06,
            "rope_scaling": {"factor": 1.0, "long_factor": "$longrope", "original_max_position_embeddings": 32786,
                             "rope_type": "longrope", "short_factor": "$longrope"},
            "rope_theta": 10000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
            "transformers_version": "4.54.0", "use_cache": True, "vocab_size": "$vocab",
            **_vision_tail(64, use_image_id=True, vision_batch_size=16),
        },
        generation_config={"_from_model_config": True, "bos_token_id": "$id:<s>",
                           "eos_token_id": ["$id:</s>", "$id:<|im_end|>"], "pad_token_id": "$id:</s>",
                           "transformers_version": "4.54.0"},
        preprocessor_config=_preprocessor(64, 4.0),
        added_tokens=MINICPM4_CHATML,
        spm_user_symbols=IMAGE_TAGS + IMAGE_ID_TAGS + UNIT_TAGS,
        chat_template=CHATML_TEMPLATE,
        tokenizer_config={"add_bos_token": True, "add_eos_token": False, "bos_token": "<s>",
                          "clean_up_tokenization_spaces": False, "eos_token": "<|im_end|>", "legacy": True,
                          "model_max_length": 1000000000000000019884624838656, "pad_token": None,
                          "sp_model_kwargs": {}, "spaces_between_special_tokens": False, "unk_token": "<unk>",
                          "use_default_system_prompt": False},
        published_tokenizer_class="MiniCPMVTokenizerFast",
        tokenizer_files=("tokenizer.model",),
        special_map_keys=("bos_token", "eos_token", "unk_token"),
        longrope=_V4_LONGROPE,
    ),
    reference=ReferenceHints("llama", "tgt", "2d", "vLLM MiniCPMV4_0; transformers PR #39899"),
))
# llama.cpp's docs convert MiniCPM-o 4.0 with version 6 too; its layout is 4.5's.
register(Family(
    "minicpm-v-4.5", "MiniCPM-V 4.5", "MiniCPMV", "4.5", "qwen3", "qwen2", "resampler", 6, video="temporal",
    synthetic=CheckpointSpec(
        builder="resampler", llm="qwen3", tokenizer="bpe-qwen2", query_num=64,
        full=dict(vocab=151748, hidden=4096, intermediate=12288, layers=36, heads=32, kv_heads=8, head_dim=128,
                  **SIGLIP_400M),
        tiny=_tiny(),
        config={"_name_or_path": "openbmb/MiniCPM-V-4_5", "version": 4.5, "architectures": ["MiniCPMV"],
                "auto_map": _AUTO_MAP_V, **_qwen_llm(1000000, 40960, None, head_dim=True),
                "batch_vision_input": True, "batch_3d_resampler": True, "drop_vision_last_layer": False,
                "image_size": 448, "model_type": "minicpmv", "patch_size": 14, "query_num": 64,
                "slice_config": dict(_SLICE), "slice_mode": True, "vision_config": dict(_VISION_CONFIG)},
        generation_config={"bos_token_id": "$id:<|endoftext|>", "do_sample": True,
                           "eos_token_id": ["$id:<|im_end|>", "$id:<|endoftext|>"],
                           "pad_token_id": "$id:<|endoftext|>", "temperature": 0.6, "top_k": 20, "top_p": 0.95,
                           "chat_template_kwargs": {"enable_thinking": False}, "transformers_version": "4.51.0"},
        preprocessor_config=_preprocessor(64, 4.5),
        added_tokens=_QWEN3_TOKENS,
        chat_template=QWEN3_THINKING_TEMPLATE,
        tokenizer_config=_qwen_tok_config(131072),
        published_tokenizer_class="MiniCPMVTokenizerFast",
        tokenizer_files=BPE_TOKENIZER_FILES,
    ),
    reference=ReferenceHints("qwen3", "tgt", "3d", "hub MiniCPM-V-4_5 modeling_minicpmv.py + resampler.py"),
))
register(Family(
    "minicpm-o-4.5", "MiniCPM-o 4.5", "MiniCPMO", "4.5", "qwen3", "qwen2", "resampler", 100045,
    skip_prefixes=OMNI_SKIP, video="temporal",
    synthetic=CheckpointSpec(
        builder="resampler", llm="qwen3", tokenizer="bpe-qwen2", query_num=64,
        full=dict(vocab=151748, hidden=4096, intermediate=12288, layers=36, heads=32, kv_heads=8, head_dim=128,
                  **SIGLIP_400M, **WHISPER_MEDIUM, tts_hidden=768, tts_intermediate=3072, tts_layers=20,
                  tts_heads=12, tts_text_vocab=21178, tts_audio_vocab=4097),
        tiny=_tiny(),
        config={"_name_or_path": "openbmb/MiniCPM-o-4_5", "version": 4.5, "architectures": ["MiniCPMO"],
                "auto_map": _AUTO_MAP_O, **_qwen_llm(1000000, 40960, None, head_dim=True),
                **_vision_tail(64, model_type="minicpmo", batch_3d_resampler=True, use_image_id=True,
                               vision_batch_size=16),
                "audio_chunk_length": 1.0, "audio_config": _WHISPER_CONFIG, "audio_pool_step": 5,
                "init_audio": True, "init_tts": True, "init_vision": True, "stream_input": False,
                "listen_speak_type": "asr",
                "tts_config": {"model_type": "minicpmtts", "llm_dim": "$hidden", "hidden_size": "$tts_hidden",
                               "intermediate_size": "$tts_intermediate", "num_attention_heads": "$tts_heads",
                               "num_hidden_layers": "$tts_layers", "num_key_value_heads": "$tts_heads",
                               "num_audio_tokens": "$tts_audio_vocab", "num_text_tokens": "$tts_text_vocab",
                               "num_vq": 1, "backbone_model": "llama", "projector_type": "mlp"}},
        generation_config={"bos_token_id": "$id:<|endoftext|>", "do_sample": True,
                           "eos_token_id": ["$id:<|im_end|>", "$id:<|endoftext|>"],
                           "pad_token_id": "$id:<|endoftext|>", "temperature": 0.6, "top_k": 20, "top_p": 0.95,
                           "transformers_version": "4.51.0"},
        preprocessor_config=_preprocessor(64, 4.5, omni=True),
        added_tokens=_QWEN3_TOKENS,
        chat_template=QWEN3_THINKING_TEMPLATE,
        tokenizer_config=_qwen_tok_config(131072),
        published_tokenizer_class="MiniCPMOTokenizerFast",
        tokenizer_files=BPE_TOKENIZER_FILES,
        audio=True, tts_layout="minicpmtts",
    ),
    reference=ReferenceHints("qwen3", "tgt", "2d", "OpenBMB/MiniCPM-o-Demo MiniCPMO45/modeling_minicpmo.py"),
))
