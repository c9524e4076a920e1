"""The families whose vision tower ends in the perceiver resampler (a fixed number of query tokens per
piece): MiniCPM-Llama3-V 2.5, MiniCPM-V 2.6 / 4.0 / 4.5 and MiniCPM-o 2.6 / 4.5. Their checkpoints share
one layout (`llm.`, `vpm.`, `resampler.`); clip.cpp tells them apart by `clip.minicpmv_version`
(tools/mtmd/clip.cpp, mtmd.cpp in the pinned llama.cpp)."""

from .registry import Family, PieceFrame, register

# MiniCPM-o's audio encoder and speech decoder: not part of a vision + text model.
OMNI_SKIP = ("apm.", "tts.", "audio_projection_layer.", "audio_avg_pooler.")

register(Family(
    "minicpm-llama3-v-2.5", "MiniCPM-Llama3-V 2.5", "MiniCPMV", "2.5", "llama", "llama-bpe", "resampler", 2,
    # 2.5's processor writes no image ids and wraps the slices in <slice> ... </slice>, each in <image>.
    use_image_id=False, frame=PieceFrame(piece=("<image>", "</image>"), slices=("<slice>", "</slice>")),
    unversioned=True))
register(Family("minicpm-v-2.6", "MiniCPM-V 2.6", "MiniCPMV", "2.6", "qwen2", "qwen2", "resampler", 3))
register(Family("minicpm-o-2.6", "MiniCPM-o 2.6", "MiniCPMO", "2.6", "qwen2", "qwen2", "resampler", 4,
                skip_prefixes=OMNI_SKIP))
# MiniCPM4-3B is published in Llama form (vLLM loads it with LlamaForCausalLM), with LongRoPE and a
# sentencepiece tokenizer ("default" pre-tokenizer); a MiniCPM-form config (scale_emb) becomes llama.cpp's
# minicpm architecture, which is what llama.cpp's own converter writes for it.
register(Family("minicpm-v-4.0", "MiniCPM-V 4.0", "MiniCPMV", "4.0", "llama", "default", "resampler", 5,
                gguf_llm_archs=("llama", "minicpm")))
# llama.cpp's docs convert MiniCPM-o 4.0 with version 6 too; its layout is 4.5's.
register(Family("minicpm-v-4.5", "MiniCPM-V 4.5", "MiniCPMV", "4.5", "qwen3", "qwen2", "resampler", 6))
register(Family("minicpm-o-4.5", "MiniCPM-o 4.5", "MiniCPMO", "4.5", "qwen3", "qwen2", "resampler", 100045,
                skip_prefixes=OMNI_SKIP))
