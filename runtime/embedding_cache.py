"""Image-piece embeddings kept on disk between runs, bounded in size: a batch rerun with another prompt or
mode (text, then Markdown) skips the vision tower, which is most of a page's cost on a CPU (about 9 s per
448x448 piece with a full-size F16 mmproj). Keys name the mmproj, the image digest, the slicing and the
piece, so a different model or layout never reads a stale entry. Oldest entries go first when full."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np


class EmbeddingCache:
    def __init__(self, folder: Path, namespace: str, max_bytes: int = 2 << 30):
        self.folder = folder
        self.namespace = namespace
        self.max_bytes = max_bytes
        folder.mkdir(parents=True, exist_ok=True)

    def _path(self, key: tuple) -> Path:
        name = hashlib.sha256(repr((self.namespace, key)).encode()).hexdigest()[:40]
        return self.folder / f"{name}.npy"

    def get(self, key: tuple) -> np.ndarray | None:
        path = self._path(key)
        try:
            value = np.load(path)
        except (OSError, ValueError):
            return None
        os.utime(path)  # recently used entries survive eviction
        return value

    def put(self, key: tuple, value: np.ndarray) -> None:
        path = self._path(key)
        partial = path.with_name(f".{path.name}.partial")
        with open(partial, "wb") as f:
            np.save(f, value)
        os.replace(partial, path)
        self._evict()

    def _evict(self) -> None:
        entries = sorted(self.folder.glob("*.npy"), key=lambda p: p.stat().st_mtime)
        total = sum(p.stat().st_size for p in entries)
        for path in entries:
            if total <= self.max_bytes:
                break
            total -= path.stat().st_size
            path.unlink(missing_ok=True)
