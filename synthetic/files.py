"""The JSON files every synthetic checkpoint writes, and the placeholders their templates use."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def render(obj: Any, dims: dict[str, Any], vocab: dict[str, int]) -> Any:
    """`obj` with "$id:<token>" replaced by the token's id and "$name" by dims[name]."""
    if isinstance(obj, dict):
        return {k: render(v, dims, vocab) for k, v in obj.items()}
    if isinstance(obj, list):
        return [render(v, dims, vocab) for v in obj]
    if isinstance(obj, str) and obj.startswith("$id:"):
        return vocab[obj[4:]]
    if isinstance(obj, str) and obj.startswith("$"):
        return dims[obj[1:]]
    return obj


def write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
