"""What a GGUF pair is: the files (a folder `minicpmv convert` wrote, or two paths), the family they belong
to, and the prompt settings the family's official processor uses. Everything is derived from what
llama.cpp itself writes (the mmproj's `clip.projector_type` and `clip.minicpmv_version`, the language
model's `general.architecture`), so pairs made by llama.cpp's converters, downloaded from the hub or pulled
by Ollama lay out prompts as the official processor does; our converter's `minicpmv_edge.*` keys, where
present, only add the checkpoint's own preprocessor settings."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from gguf import GGUFReader, GGUFValueType

from minicpmv_edge.families import FAMILY_KEY, Family, UnknownFamily, from_gguf

from .engine import EngineError
from .hub import parse_hub_spec, resolve_hub_pair

# Keys the runtime reads from the language model; the vocabulary arrays are never needed here.
LLM_KEYS = ("general.architecture", FAMILY_KEY, "minicpmv_edge.use_image_id", "minicpmv_edge.max_slice_nums",
            "minicpmv_edge.small_image_upsize")


def split_model_arguments(args: Sequence[str]) -> tuple[list[str], list[str]]:
    """(MODEL, what follows) of a command line: MODEL is a folder, a hub GGUF repo `owner/name[:QUANT]`, or
    the model GGUF and the mmproj GGUF (two arguments ending in .gguf)."""
    if len(args) >= 2 and all(arg.lower().endswith(".gguf") for arg in args[:2]):
        return list(args[:2]), list(args[2:])
    return list(args[:1]), list(args[1:])


def resolve_pair(model: str | Path, mmproj: str | Path | None = None) -> tuple[Path, Path]:
    """The two files of a pair given as a folder, a hub spec (downloaded into the HF cache when missing), or
    two paths."""
    if mmproj is not None:
        return _existing(Path(model).expanduser()), _existing(Path(mmproj).expanduser())
    path = Path(model).expanduser()
    if path.is_dir():
        return find_pair(path)
    spec = parse_hub_spec(str(model))
    if spec is not None:
        return resolve_hub_pair(spec)
    if path.is_file():
        raise EngineError(f"{path} is one file; give the model GGUF and the mmproj GGUF, or their folder")
    raise EngineError(f"no such folder or file: {path} (MODEL is a folder, owner/name[:QUANT] on the hub, or "
                      "the model GGUF and the mmproj GGUF)")


def _existing(path: Path) -> Path:
    if not path.is_file():
        raise EngineError(f"no such file: {path}")
    return path


def find_pair(folder: Path) -> tuple[Path, Path]:
    """The language model and mmproj GGUF that `minicpmv convert` (or a download) put into `folder`."""
    ggufs = sorted(folder.glob("*.gguf"))
    mmprojs = [p for p in ggufs if "mmproj" in p.name]
    models = [p for p in ggufs if "mmproj" not in p.name]
    if len(mmprojs) != 1 or len(models) != 1:
        raise EngineError(f"{folder} should hold one model GGUF and one mmproj GGUF; found "
                          f"{[p.name for p in ggufs] or 'none'}")
    return models[0], mmprojs[0]


def read_metadata(path: Path) -> dict[str, Any]:
    """A GGUF file's key-value metadata as Python values (arrays as lists)."""
    try:
        reader = GGUFReader(path)
    except (OSError, ValueError) as e:
        raise EngineError(f"{path} is not a readable GGUF file: {e}") from None
    out: dict[str, Any] = {}
    for name, field in reader.fields.items():
        if name.startswith("GGUF."):
            continue
        value = field.contents()
        if field.types and field.types[0] == GGUFValueType.ARRAY and not isinstance(value, list):
            value = list(value)
        out[name] = value
    return out


@dataclass(frozen=True)
class PromptSettings:
    family: Family
    use_image_id: bool
    max_slice_nums: int
    from_file: bool  # the settings came from our converter's keys, not from the family's published defaults
    # How unsliced images are sized (the processor's `small_image_upsize`, one of the family's modes).
    small_image_upsize: str = "always"


def prompt_settings(llm_value: Callable[[str], str | None], mmproj: dict[str, Any]) -> PromptSettings:
    """The family and prompt settings of a pair, from the language model's metadata (`llm_value(key)`, the
    value as a string or None) and the mmproj's."""
    llm = {key: llm_value(key) for key in LLM_KEYS}
    try:
        family = from_gguf(llm, mmproj)
    except UnknownFamily as e:
        raise EngineError(f"cannot tell which MiniCPM-V family this pair is: {e}") from None
    use_image_id, max_slice_nums = llm["minicpmv_edge.use_image_id"], llm["minicpmv_edge.max_slice_nums"]
    upsize = llm["minicpmv_edge.small_image_upsize"] or family.small_image_upsize[0]
    if upsize not in family.small_image_upsize:
        raise EngineError(f"the model GGUF's minicpmv_edge.small_image_upsize {upsize!r} is none of {family.title}'s "
                          f"modes ({', '.join(family.small_image_upsize)})")
    return PromptSettings(
        family,
        family.use_image_id if use_image_id is None else use_image_id == "true",
        family.max_slice_nums if max_slice_nums is None else int(max_slice_nums),
        from_file=use_image_id is not None and max_slice_nums is not None,
        small_image_upsize=upsize)
