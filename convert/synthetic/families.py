"""Per-family facts of the published MiniCPM-V / MiniCPM-o "resampler" checkpoints, as data.

Everything that differs between families lives in the `SPECS` table; the writer in `factory.py`
is one generic code path. Sources and confidence of every value: `PUBLISHED.md` beside this file.

Templates: strings of the form ``"$name"`` are replaced by a size-dependent number (see
`TINY` and each spec's `full`), ``"$id:<token>"`` by that token's id in the synthetic tokenizer
(ids differ from the published ones because the vocabulary is tiny; the *structure* is kept).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# --- chat templates (verbatim from the published tokenizer_config.json where confirmed) -------

LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

QWEN2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

CHATML_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content']"
    " + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# MiniCPM-V 4.5 (Qwen3 thinking template; `enable_thinking` switch). Raw string: `\n` inside the
# Jinja string literals is part of the published template source.
QWEN3_THINKING_TEMPLATE = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0].role == 'system' %}
        {{- messages[0].content + '\n\n' }}
    {%- endif %}
    {{- "# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0].role == 'system' %}
        {{- '<|im_start|>system\n' + messages[0].content + '<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == "user" and not(message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) %}
        {%- set ns.multi_step_tool = false %}
        {%- set ns.last_query_index = index %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {%- set content = message.content %}
        {%- set reasoning_content = '' %}
        {%- if message.reasoning_content is defined and message.reasoning_content is not none %}
            {%- set reasoning_content = message.reasoning_content %}
        {%- else %}
            {%- if '</think>' in message.content %}
                {%- set content = message.content.split('</think>')[-1].lstrip('\n') %}
                {%- set reasoning_content = message.content.split('</think>')[0].rstrip('\n').split('<think>')[-1].lstrip('\n') %}
            {%- endif %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query_index %}
            {%- if loop.last or (not loop.last and reasoning_content) %}
                {{- '<|im_start|>' + message.role + '\n<think>\n' + reasoning_content.strip('\n') + '\n</think>\n\n' + content.lstrip('\n') }}
            {%- else %}
                {{- '<|im_start|>' + message.role + '\n' + content }}
            {%- endif %}
        {%- else %}
            {{- '<|im_start|>' + message.role + '\n' + content }}
        {%- endif %}
        {%- if message.tool_calls %}
            {%- for tool_call in message.tool_calls %}
                {%- if (loop.first and content) or (not loop.first) %}
                    {{- '\n' }}
                {%- endif %}
                {%- if tool_call.function %}
                    {%- set tool_call = tool_call.function %}
                {%- endif %}
                {{- '<tool_call>\n{"name": "' }}
                {{- tool_call.name }}
                {{- '", "arguments": ' }}
                {%- if tool_call.arguments is string %}
                    {{- tool_call.arguments }}
                {%- else %}
                    {{- tool_call.arguments | tojson }}
                {%- endif %}
                {{- '}\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- message.content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\n\n</think>\n\n' }}
    {%- endif %}
    {%- if enable_thinking is defined and enable_thinking is true %}
        {{- '<think>\n' }}
    {%- endif %}
{%- endif %}"""

# --- special-token lists, in id order (content, special) ----------------------------------------

_S, _N = True, False
QWEN2_BASE = (("<|endoftext|>", _S), ("<|im_start|>", _S), ("<|im_end|>", _S))
QWEN25_BASE = QWEN2_BASE + tuple(
    (t, _S) for t in ("<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>", "<|box_end|>",
                      "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
                      "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>")
) + tuple((t, _N) for t in ("<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>",
                           "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>"))
QWEN3_BASE = QWEN25_BASE + tuple((t, _N) for t in ("<tool_response>", "</tool_response>", "<think>", "</think>"))
LLAMA3_BASE = tuple((t, _S) for t in (
    "<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
    "<|reserved_special_token_2|>", "<|reserved_special_token_3|>", "<|start_header_id|>",
    "<|end_header_id|>", "<|reserved_special_token_4|>", "<|eot_id|>"))
MINICPM4_CHATML = tuple((t, _S) for t in (
    "<|im_end|>", "<|im_start|>", "<|tool_call|>", "<|execute_start|>", "<|execute_end|>",
    "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>"))

_IMG = ("<image>", "</image>", "<ref>", "</ref>", "<box>", "</box>", "<quad>", "</quad>",
        "<point>", "</point>", "<slice>", "</slice>")
_IMG_ID = ("<image_id>", "</image_id>")
_UNIT = ("<unit>", "</unit>")
_AUDIO = ("<|audio_start|>", "<|audio|>", "<|audio_end|>", "<|spk_bos|>", "<|spk|>", "<|spk_eos|>",
          "<|tts_bos|>", "<|tts_eos|>", "<|listen|>", "<|speak|>", "<|interrupt|>", "<|vad_start|>",
          "<|vad_end|>", "<|emotion_start|>", "<|emotion_end|>", "<|speed_start|>", "<|speed_end|>",
          "<|pitch_start|>", "<|pitch_end|>")


def _special(*groups: tuple[str, ...]) -> tuple[tuple[str, bool], ...]:
    return tuple((t, _S) for g in groups for t in g)


# --- sizes -----------------------------------------------------------------------------------

# Tiny keeps llama.cpp's hard-coded invariants: LLM hidden % 128 == 0 (resampler head size 128)
# and the 980 px / 14 px vision grid (70x70 position table); everything else shrinks.
TINY: dict[str, int] = dict(
    hidden=256, intermediate=512, layers=4, heads=4, kv_heads=2, head_dim=64,
    v_hidden=128, v_intermediate=256, v_layers=2, v_heads=2,
    a_dmodel=64, a_ffn=128, a_layers=1, a_heads=2,
    tts_hidden=64, tts_intermediate=128, tts_layers=1, tts_heads=2, tts_text_vocab=96, tts_audio_vocab=80,
)
SIGLIP_400M = dict(v_hidden=1152, v_intermediate=4304, v_layers=27, v_heads=16)
WHISPER_MEDIUM = dict(a_dmodel=1024, a_ffn=4096, a_layers=24, a_heads=16)


@dataclass(frozen=True)
class Family:
    key: str
    llm: str                      # tensor layout: "llama" | "qwen2" (q/k/v bias) | "qwen3" (q/k norm)
    tokenizer: str                # "bpe-llama3" | "bpe-qwen2" | "spm-llama"
    query_num: int
    full: dict[str, Any]          # published dims (vocab = published vocab_size)
    config: dict[str, Any]        # config.json template, published key order
    generation_config: dict[str, Any]
    preprocessor_config: dict[str, Any]
    added_tokens: tuple[tuple[str, bool], ...]   # appended after the trained vocabulary, in id order
    spm_user_symbols: tuple[str, ...] = ()       # sentencepiece families: pieces inside the .model
    tokenizer_config: dict[str, Any] = field(default_factory=dict)
    published_tokenizer_class: str = ""
    tokenizer_files: tuple[str, ...] = ()        # extra tokenizer files the published repo ships
    audio: bool = False                          # MiniCPM-o: apm.*, audio_projection_layer.*, tts.*
    tie_word_embeddings: bool = False
    tts_layout: str = ""                         # "chattts" (o-2.6) | "minicpmtts" (o-4.5)
    # Tiny-size overrides that keep a published quirk visible (e.g. head_dim != hidden / heads).
    tiny: dict[str, int] = field(default_factory=dict)
    # special_tokens_map.json keys besides additional_special_tokens (published Qwen-based maps omit bos/unk)
    special_map_keys: tuple[str, ...] = ("eos_token", "pad_token")


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
        **({"rope_scaling": None} if head_dim else {}), "rope_theta": rope_theta, "sliding_window": sliding, "tie_word_embeddings": False,
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


def _qwen_tok_config(template: str, max_len: int) -> dict[str, Any]:
    return {"add_bos_token": False, "add_prefix_space": False, "bos_token": "<|im_start|>",
            "chat_template": template, "clean_up_tokenization_spaces": False, "eos_token": "<|im_end|>",
            "errors": "replace", "extra_special_tokens": {}, "model_max_length": max_len,
            "pad_token": "<|endoftext|>", "split_special_tokens": False, "unk_token": "<unk>"}


# Published MiniCPM-V 4.0 longrope factors (64 = head_dim / 2 entries); tiny models resample them.
_V4_LONGROPE = [
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
]

_QWEN3_TOKENS = QWEN3_BASE + _special(_IMG, _IMG_ID, _UNIT, tuple(f"<|reserved_{i}|>" for i in range(63))) + (("<unk>", _S),)

SPECS: dict[str, Family] = {f.key: f for f in (
    Family(
        key="minicpm-llama3-v-2.5", llm="llama", tokenizer="bpe-llama3", query_num=96,
        full=dict(vocab=128256, hidden=4096, intermediate=14336, layers=32, heads=32, kv_heads=8, **SIGLIP_400M),
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
        added_tokens=LLAMA3_BASE + (("<unk>", _S),) + _special(_IMG),
        tokenizer_config={"bos_token": "<|begin_of_text|>", "chat_template": LLAMA3_TEMPLATE,
                          "clean_up_tokenization_spaces": True, "eos_token": "<|end_of_text|>",
                          "model_input_names": ["input_ids", "attention_mask"],
                          "model_max_length": 1000000000000000019884624838656, "pad_token": "!",
                          "unk_token": "<unk>"},
        published_tokenizer_class="MiniCPMVTokenizerFast",
        special_map_keys=("bos_token", "eos_token", "pad_token", "unk_token"),
    ),
    Family(
        key="minicpm-v-2.6", llm="qwen2", tokenizer="bpe-qwen2", query_num=64,
        full=dict(vocab=151666, hidden=3584, intermediate=18944, layers=28, heads=28, kv_heads=4, **SIGLIP_400M),
        config={"_name_or_path": "openbmb/MiniCPM-V-2_6", "version": 2.6, "architectures": ["MiniCPMV"],
                "auto_map": _AUTO_MAP_V, **_qwen_llm(1000000.0, 32768, 131072, head_dim=False),
                **_vision_tail(64, use_image_id=True, vision_batch_size=16)},
        generation_config={"_from_model_config": True, "bos_token_id": "$id:<|endoftext|>",
                           "eos_token_id": "$id:<|im_end|>", "transformers_version": "4.40.0"},
        preprocessor_config=_preprocessor(64, 2.6),
        added_tokens=QWEN2_BASE + _special(_IMG, _IMG_ID, tuple(f"<|reserved_special_token_{i}|>" for i in range(6)))
        + (("<unk>", _S),),
        tokenizer_config=_qwen_tok_config(QWEN2_TEMPLATE, 32768),
        published_tokenizer_class="MiniCPMVTokenizerFast",
        tokenizer_files=("vocab.json", "merges.txt", "added_tokens.json"),
    ),
    Family(
        key="minicpm-o-2.6", llm="qwen2", tokenizer="bpe-qwen2", query_num=64,
        full=dict(vocab=151700, hidden=3584, intermediate=18944, layers=28, heads=28, kv_heads=4,
                  **SIGLIP_400M, **WHISPER_MEDIUM, tts_hidden=768, tts_intermediate=3072, tts_layers=20,
                  tts_heads=12, tts_text_vocab=21178, tts_audio_vocab=626),
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
        added_tokens=QWEN25_BASE + _special(_IMG, _IMG_ID, _UNIT, _AUDIO) + (("<unk>", _S),),
        tokenizer_config=_qwen_tok_config(QWEN2_TEMPLATE, 131072),
        published_tokenizer_class="MiniCPMOTokenizerFast",
        tokenizer_files=("vocab.json", "merges.txt", "added_tokens.json"),
        audio=True, tts_layout="chattts",
    ),
    Family(
        key="minicpm-v-4.0", llm="llama", tokenizer="spm-llama", query_num=64,
        full=dict(vocab=73448, hidden=2560, intermediate=10240, layers=32, heads=32, kv_heads=2, head_dim=128,
                  **SIGLIP_400M),
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
        spm_user_symbols=_IMG + _IMG_ID + _UNIT,
        tokenizer_config={"add_bos_token": True, "add_eos_token": False, "bos_token": "<s>",
                          "chat_template": CHATML_TEMPLATE, "clean_up_tokenization_spaces": False,
                          "eos_token": "<|im_end|>", "legacy": True,
                          "model_max_length": 1000000000000000019884624838656, "pad_token": None,
                          "sp_model_kwargs": {}, "spaces_between_special_tokens": False, "unk_token": "<unk>",
                          "use_default_system_prompt": False},
        published_tokenizer_class="MiniCPMVTokenizerFast",
        tokenizer_files=("tokenizer.model",),
        special_map_keys=("bos_token", "eos_token", "unk_token"),
        tiny=dict(head_dim=128),   # published: 32 heads x 128 on hidden 2560, so q_proj is not square
    ),
    Family(
        key="minicpm-v-4.5", llm="qwen3", tokenizer="bpe-qwen2", query_num=64,
        full=dict(vocab=151748, hidden=4096, intermediate=12288, layers=36, heads=32, kv_heads=8, head_dim=128,
                  **SIGLIP_400M),
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
        tokenizer_config=_qwen_tok_config(QWEN3_THINKING_TEMPLATE, 131072),
        published_tokenizer_class="MiniCPMVTokenizerFast",
        tokenizer_files=("vocab.json", "merges.txt", "added_tokens.json"),
    ),
    Family(
        key="minicpm-o-4.5", llm="qwen3", tokenizer="bpe-qwen2", query_num=64,
        full=dict(vocab=151748, hidden=4096, intermediate=12288, layers=36, heads=32, kv_heads=8, head_dim=128,
                  **SIGLIP_400M, **WHISPER_MEDIUM, tts_hidden=768, tts_intermediate=3072, tts_layers=20,
                  tts_heads=12, tts_text_vocab=21178, tts_audio_vocab=4097),
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
        tokenizer_config=_qwen_tok_config(QWEN3_THINKING_TEMPLATE, 131072),
        published_tokenizer_class="MiniCPMOTokenizerFast",
        tokenizer_files=("vocab.json", "merges.txt", "added_tokens.json"),
        audio=True, tts_layout="minicpmtts",
    ),
)}

FAMILIES: tuple[str, ...] = tuple(SPECS)


def get_family(key: str) -> Family:
    try:
        return SPECS[key]
    except KeyError:
        raise ValueError(f"unknown MiniCPM-V family {key!r}; known: {', '.join(FAMILIES)}") from None


def longrope_factors(head_dim: int) -> list[float]:
    """The published 4.0 factors resampled to head_dim/2 entries (llama.cpp wants n_rot/2)."""
    n = head_dim // 2
    src = _V4_LONGROPE
    return [src[round(i * (len(src) - 1) / max(n - 1, 1))] for i in range(n)]
