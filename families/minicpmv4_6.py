"""MiniCPM-V 4.6 and 4.6-Thinking (transformers' MiniCPMV4_6ForConditionalGeneration): Qwen3.5-0.8B
(llama.cpp's `qwen35`, linear + full attention) behind a SigLIP tower whose token merger replaces the
resampler (`clip.projector_type` minicpmv4_6). Both variants share weights layout and config; only their
chat templates differ, and the GGUF carries the template."""

from .registry import MERGER_LAYOUT, Family, register

register(Family("minicpm-v-4.6", "MiniCPM-V 4.6", "MiniCPMV4_6ForConditionalGeneration", "", "qwen35", "qwen35",
                "minicpmv4_6", layout=MERGER_LAYOUT, unversioned=True))
