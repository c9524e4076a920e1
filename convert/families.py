"""The MiniCPM-V families we convert, as data: how to recognise each from config.json and what differs
between them (the language-model architecture, the clip.cpp projector version, the tokenizer's
pre-tokenizer). The per-architecture details of the language model live in `llm_archs`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .errors import ConversionError
from .llm_archs import LLM_ARCHS, LlmArch


@dataclass(frozen=True)
class Layout:
    """Where a checkpoint keeps its parts: the resampler families nest the LLM under `llm.` with its
    hyper-parameters at the top of config.json; MiniCPM-V 4.6 (transformers' own class) nests it under
    `model.language_model.` with a `text_config`, and replaces the resampler by a token merger."""

    llm_prefix: str  # published prefix of the language model's tensors
    llm_inner_prefix: str  # what replaces it so gguf's tensor-name tables recognise the names
    vision_prefixes: tuple[str, ...]
    projector: str  # "resampler" | "merger": selects the mmproj planner
    text_config: str | None = None  # config.json key holding the LLM's hyper-parameters; None: the top level

    def llm_config(self, config: dict[str, Any]) -> dict[str, Any]:
        if self.text_config is None:
            return config
        sub = config.get(self.text_config)
        if not isinstance(sub, dict):
            raise ConversionError(f"config.json lacks the key {self.text_config!r}")
        return sub


RESAMPLER = Layout("llm.", "", ("vpm.", "resampler."), "resampler")
MERGER = Layout("model.language_model.", "model.", ("model.vision_tower.", "model.merger."), "merger", "text_config")


@dataclass(frozen=True)
class Family:
    key: str
    title: str
    architecture: str  # config.json "architectures"[0]
    version: str  # config.json "version", as a string ("" where the config has none)
    llm: LlmArch
    tokenizer_pre: str  # tokenizer.ggml.pre: llama.cpp's pre-tokenizer regex set, named per family, not hashed
    minicpmv_version: int  # clip.minicpmv_version: selects clip.cpp's preprocessing and query count defaults
    # Prefixes of published tensors that are not part of a vision+text model (MiniCPM-o's audio and TTS).
    skip_prefixes: tuple[str, ...] = ()
    # The oldest published config carries no "version" key (vLLM reads such configs as 2.5 too).
    unversioned: bool = False
    layout: Layout = RESAMPLER


_OMNI_SKIP = ("apm.", "tts.", "audio_projection_layer.", "audio_avg_pooler.")

FAMILIES: tuple[Family, ...] = (
    Family("minicpm-llama3-v-2.5", "MiniCPM-Llama3-V 2.5", "MiniCPMV", "2.5", LLM_ARCHS["llama"], "llama-bpe", 2,
           unversioned=True),
    Family("minicpm-v-2.6", "MiniCPM-V 2.6", "MiniCPMV", "2.6", LLM_ARCHS["qwen2"], "qwen2", 3),
    Family("minicpm-o-2.6", "MiniCPM-o 2.6", "MiniCPMO", "2.6", LLM_ARCHS["qwen2"], "qwen2", 4, _OMNI_SKIP),
    # MiniCPM4-3B is published in Llama form (vLLM loads it with LlamaForCausalLM), with LongRoPE and a
    # sentencepiece tokenizer ("default" pre-tokenizer).
    Family("minicpm-v-4.0", "MiniCPM-V 4.0", "MiniCPMV", "4.0", LLM_ARCHS["llama"], "default", 5),
    Family("minicpm-v-4.5", "MiniCPM-V 4.5", "MiniCPMV", "4.5", LLM_ARCHS["qwen3"], "qwen2", 6),
    Family("minicpm-o-4.5", "MiniCPM-o 4.5", "MiniCPMO", "4.5", LLM_ARCHS["qwen3"], "qwen2", 100045, _OMNI_SKIP),
    # 4.6 and 4.6-Thinking share weights layout and config; only their chat templates differ.
    Family("minicpm-v-4.6", "MiniCPM-V 4.6", "MiniCPMV4_6ForConditionalGeneration", "", LLM_ARCHS["qwen35"],
           "qwen35", 0, unversioned=True, layout=MERGER),
)


def _version_string(value: Any) -> str:
    try:
        return f"{float(value):.1f}"
    except (TypeError, ValueError):
        return str(value)


def supported_list() -> str:
    return "; ".join(f"{f.title} ({f.architecture}" + (f", version {f.version})" if f.version else ")")
                     for f in FAMILIES)


def detect_family(config: dict[str, Any]) -> Family:
    """The family of a checkpoint from its config.json `architectures` and `version`."""
    architectures = config.get("architectures") or []
    architecture = architectures[0] if architectures else config.get("model_type", "?")
    version = _version_string(config.get("version"))
    for family in FAMILIES:
        if family.architecture == architecture and (
                family.version == version or (family.unversioned and config.get("version") is None)):
            return family
    raise ConversionError(f"unsupported model: architecture {architecture}, version {version}. "
                          f"Supported: {supported_list()}")
