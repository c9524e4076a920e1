"""The registry every part of the project asks about a MiniCPM-V family: how to recognise it (from a
checkpoint's config.json, or from the GGUF pair llama.cpp's converters or ours wrote) and what differs
between families (the language model's llama.cpp architecture, the projector, the tokenizer's
pre-tokenizer, the processor's prompt framing and published defaults; and, for the synthetic checkpoint
factory and the tests, the published checkpoint's files and the torch reference to check against: specs.py).
Pure data: it imports neither the converter, nor the runtime, nor torch, so all of them can read it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

from .specs import CheckpointSpec, ReferenceHints


class UnknownFamily(ValueError):
    """Nothing in the given config or GGUF metadata names a family this project supports."""


@dataclass(frozen=True)
class PieceFrame:
    """The text around an image's pieces, as the family's processor (and llama.cpp's mtmd template) writes it."""

    overview: tuple[str, str] = ("<image>", "</image>")
    piece: tuple[str, str] = ("<slice>", "</slice>")
    slices: tuple[str, str] = ("", "")  # around all slices (2.5 wraps them in <slice> ... </slice>)
    row_separator: str = "\n"


@dataclass(frozen=True)
class Layout:
    """Where a checkpoint keeps its parts: the resampler families nest the LLM under `llm.` with its
    hyper-parameters at the top of config.json; MiniCPM-V 4.6 (transformers' own class) nests it under
    `model.language_model.` with a `text_config`, and replaces the resampler by a token merger."""

    llm_prefix: str  # published prefix of the language model's tensors
    llm_inner_prefix: str  # what replaces it so gguf's tensor-name tables recognise the names
    vision_prefixes: tuple[str, ...]
    text_config: str | None = None  # config.json key holding the LLM's hyper-parameters; None: the top level
    # The untied output projection where it sits outside `llm_prefix` (transformers' classes keep it at the top
    # level); "": inside `llm_prefix`, or none.
    lm_head: str = ""


RESAMPLER_LAYOUT = Layout("llm.", "", ("vpm.", "resampler."))
MERGER_LAYOUT = Layout("model.language_model.", "model.", ("model.vision_tower.", "model.merger."), "text_config",
                       lm_head="lm_head.weight")

# How an image that is not sliced is sized (the image processor's `small_image_upsize`): "always" scales it to
# about scale_resolution^2 pixels (every family's processor), "never" keeps its native size (aligned to the
# piece grid; larger images still shrink), "adaptive" decides per image and slice from its glyphs (OpenCV).
UPSIZE_MODES = ("always", "never", "adaptive")

# "temporal": the 3D resampler (MiniCPM-V 4.5, MiniCPM-o 4.5): frames chosen as the model card's encode_video
# does, grouped by temporal ids, each group one 64-token block at its first frame's place; `temporal_ids` in
# chat(). "frames": MiniCPM-V 4.6's video processor: one frame per second (plus stacked sub-second composites),
# each frame its own piece, the placeholders of one video back to back.
VIDEO_MODES = ("temporal", "frames")


@dataclass(frozen=True)
class Family:
    key: str
    title: str
    architecture: str  # config.json "architectures"[0]
    version: str  # config.json "version", as a string ("" where the config has none)
    # The converter's LLM architecture (a key of convert/llm_archs.py's LLM_ARCHS; its llama.cpp name is the
    # GGUF's general.architecture, listed in gguf_llm_archs where the two differ)
    llm_arch: str
    tokenizer_pre: str  # tokenizer.ggml.pre: llama.cpp's pre-tokenizer regex set, named per family, not hashed
    projector: str  # clip.projector_type: "resampler" or "minicpmv4_6"
    minicpmv_version: int = 0  # clip.minicpmv_version of resampler projectors
    # What the published processor does when the caller says nothing (preprocessor_config.json).
    use_image_id: bool = True
    max_slice_nums: int = 9
    # The `small_image_upsize` modes the family's processor offers, its published default first (UPSIZE_MODES).
    small_image_upsize: tuple[str, ...] = ("always",)
    frame: PieceFrame = PieceFrame()
    # How a video becomes prompt pieces (VIDEO_MODES); "": the family has no published video path.
    video: str = ""
    layout: Layout = RESAMPLER_LAYOUT
    # Prefixes of published tensors that are not part of a vision+text model (MiniCPM-o's audio and TTS).
    skip_prefixes: tuple[str, ...] = ()
    # The oldest published config carries no "version" key (vLLM reads such configs as 2.5 too).
    unversioned: bool = False
    # Language-model architectures a GGUF of this family may carry (llama.cpp's converter can pick another
    # one than ours for the same weights).
    gguf_llm_archs: tuple[str, ...] = ()
    # How the language model places prompt positions: "sequential" (one index per item), or "canvas"
    # (MiniCPM-V 4.7's canvas M-RoPE: an image's tokens sit on a 2-D canvas; runtime/canvas_rope.py).
    positions: str = "sequential"
    # clip.projector_type values other converters write for this family (llama.cpp's newer converter: 4.7 as
    # "minicpmv4_7"), so such a pair is recognised, and refused where the runtime cannot honour it.
    foreign_projectors: tuple[str, ...] = ()
    # What a synthetic checkpoint of the family looks like (minicpmv_edge.synthetic writes it) and which torch
    # reference the tests build for it (tests/reference.py; None: the family has none there). Pure data, left
    # out of equality and hashing.
    synthetic: CheckpointSpec | None = field(default=None, compare=False, repr=False)
    reference: ReferenceHints | None = field(default=None, compare=False, repr=False)

    @property
    def accepted_llm_archs(self) -> tuple[str, ...]:
        return self.gguf_llm_archs or (self.llm_arch,)


_REGISTRY: dict[str, Family] = {}


def register(family: Family) -> Family:
    if family.key in _REGISTRY:
        raise ValueError(f"family {family.key} is registered twice")
    _REGISTRY[family.key] = family
    return family


def families() -> tuple[Family, ...]:
    return tuple(_REGISTRY.values())


def get(key: str) -> Family:
    try:
        return _REGISTRY[key]
    except KeyError:
        raise UnknownFamily(f"unknown family {key!r}; known: {', '.join(_REGISTRY)}") from None


def supported_list() -> str:
    return "; ".join(f"{f.title} ({f.architecture}" + (f", version {f.version})" if f.version else ")")
                     for f in _REGISTRY.values())


def _version_string(value: Any) -> str:
    try:
        return f"{float(value):.1f}"
    except (TypeError, ValueError):
        return str(value)


def from_config(config: Mapping[str, Any]) -> Family:
    """The family of a checkpoint from its config.json `architectures` and `version`."""
    architectures = config.get("architectures") or []
    architecture = architectures[0] if architectures else config.get("model_type", "?")
    version = _version_string(config.get("version"))
    for family in _REGISTRY.values():
        if family.architecture == architecture and (
                family.version == version or (family.unversioned and config.get("version") is None)):
            return family
    raise UnknownFamily(f"unsupported model: architecture {architecture}, version {version}. "
                        f"Supported: {supported_list()}")


# The key our converter adds to the language-model GGUF; llama.cpp's converters write none.
FAMILY_KEY = "minicpmv_edge.family"


def from_gguf(llm: Mapping[str, Any], mmproj: Mapping[str, Any]) -> Family:
    """The family of a GGUF pair from the metadata llama.cpp itself reads: the projector type and, for the
    resampler, clip.minicpmv_version (in the mmproj), cross-checked against the language model's
    general.architecture. Our own `minicpmv_edge.family` key, where present, names it directly."""
    arch = llm.get("general.architecture")
    if llm.get(FAMILY_KEY) in _REGISTRY:
        family = _REGISTRY[llm[FAMILY_KEY]]
    else:
        family = _from_projector(mmproj, arch)
    if arch not in family.accepted_llm_archs:
        raise UnknownFamily(f"the mmproj is {family.title}'s, but the language model's general.architecture is "
                            f"{arch!r}, not {' or '.join(family.accepted_llm_archs)}: are the two files one pair?")
    return family


def _from_projector(mmproj: Mapping[str, Any], llm_arch: Any) -> Family:
    projector = mmproj.get("clip.projector_type")
    if projector is None and mmproj.get("clip.has_minicpmv_projector"):
        projector = "resampler"  # mmproj files written before clip.projector_type existed
    if projector is None:
        raise UnknownFamily("the mmproj has no clip.projector_type (nor clip.has_minicpmv_projector): "
                            "it is not a MiniCPM-V vision tower")
    candidates = [f for f in _REGISTRY.values() if f.projector == projector]
    foreign = [f for f in _REGISTRY.values() if projector in f.foreign_projectors]
    if not candidates and foreign:
        return foreign[0]
    if not candidates:
        raise UnknownFamily(f"the mmproj's clip.projector_type is {projector!r}; MiniCPM-V projectors are "
                            f"{', '.join(sorted({f.projector for f in _REGISTRY.values()}))}")
    if projector != "resampler":
        return candidates[0]
    version = mmproj.get("clip.minicpmv_version")
    if version is None:
        # clip.cpp reads a resampler without a version as 2 (MiniCPM-Llama3-V 2.5); so do we, but only where
        # the language model agrees.
        version = 2
        if llm_arch != "llama":
            raise UnknownFamily("the mmproj has no clip.minicpmv_version, and its language model "
                                f"({llm_arch}) is not MiniCPM-Llama3-V 2.5's")
    for family in candidates:
        if family.minicpmv_version == int(version):
            return family
    raise UnknownFamily(f"clip.minicpmv_version {version} is no family this project supports; supported: "
                        + ", ".join(f"{f.minicpmv_version} ({f.title})" for f in candidates))
