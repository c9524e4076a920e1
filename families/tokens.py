"""Special-token lists the families' tokenizers share: (content, special) pairs in id order, appended after
the synthetic tokenizer's trained vocabulary with their published contents and `special` flags."""

from __future__ import annotations

_S, _N = True, False  # special / normal added token
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

# MiniCPM-V's own tags.
IMAGE_TAGS = ("<image>", "</image>", "<ref>", "</ref>", "<box>", "</box>", "<quad>", "</quad>",
              "<point>", "</point>", "<slice>", "</slice>")
IMAGE_ID_TAGS = ("<image_id>", "</image_id>")
UNIT_TAGS = ("<unit>", "</unit>")
AUDIO_TOKENS = ("<|audio_start|>", "<|audio|>", "<|audio_end|>", "<|spk_bos|>", "<|spk|>", "<|spk_eos|>",
                "<|tts_bos|>", "<|tts_eos|>", "<|listen|>", "<|speak|>", "<|interrupt|>", "<|vad_start|>",
                "<|vad_end|>", "<|emotion_start|>", "<|emotion_end|>", "<|speed_start|>", "<|speed_end|>",
                "<|pitch_start|>", "<|pitch_end|>")


def special(*groups: tuple[str, ...]) -> tuple[tuple[str, bool], ...]:
    """The tokens of `groups`, each a special added token."""
    return tuple((t, _S) for g in groups for t in g)
