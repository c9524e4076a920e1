"""What a GGUF file holds: its role, family, tensor types and sizes, and the metadata loaders read."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from gguf import GGUFReader, GGUFValueType

from .engine import EngineError

_SHOWN_PREFIXES = ("general.", "clip.", "minicpmv_edge.", "tokenizer.ggml.model", "tokenizer.ggml.pre")
_HIDDEN_SUFFIXES = ("tokens", "token_type", "scores", "merges")


def _value(field) -> Any:  # noqa: ANN001 - gguf's ReaderField
    value = field.contents()
    if field.types and field.types[0] == GGUFValueType.ARRAY and isinstance(value, list) and len(value) > 8:
        return f"[{len(value)} values]"
    return value


def describe_gguf(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        reader = GGUFReader(path)
    except (OSError, ValueError) as e:
        raise EngineError(f"{path} is not a readable GGUF file: {e}") from None
    fields = {name: field for name, field in reader.fields.items() if not name.startswith("GGUF.")}
    arch = fields["general.architecture"].contents() if "general.architecture" in fields else "?"
    shown = {name: _value(field) for name, field in fields.items()
             if (name.startswith(_SHOWN_PREFIXES) or name.startswith(f"{arch}."))
             and not name.endswith(_HIDDEN_SUFFIXES)}
    types = Counter(t.tensor_type.name for t in reader.tensors)
    return {
        "file": str(path),
        "role": "mmproj" if arch == "clip" else "language model",
        "architecture": arch,
        "family": shown.get("minicpmv_edge.family") or shown.get("general.name", "?"),
        "bytes": path.stat().st_size,
        "tensors": len(reader.tensors),
        "parameters": int(sum(int(t.n_elements) for t in reader.tensors)),
        "tensor_types": dict(sorted(types.items())),
        "metadata": shown,
    }
