"""Image-piece embeddings kept between prompts, in memory and on disk, both bounded in bytes.

`EmbeddingMemory` holds what the current conversation references (it must stay: the KV cache's history
and a context regrowth read it) plus the most recently used other pieces up to a byte bound, so a long
batch runs in flat memory (a piece of MiniCPM-V 4.5 is 64 x 4096 float32 = 1 MiB, a dense page ~10
pieces).

`EmbeddingCache` keeps them on disk between runs: a batch rerun with another prompt or mode (text, then
Markdown) skips the vision tower, which is most of a page's cost on a CPU (about 9 s per 448x448 piece with
a full-size F16 mmproj). Keys name the mmproj, the image digest, the slicing and the piece, so a different
model or layout never reads a stale entry. Oldest entries go first when full."""

from __future__ import annotations

import hashlib
import os
from collections import OrderedDict
from pathlib import Path
from typing import Hashable, Iterable

import numpy as np

from minicpmv_edge.common.files import atomic_write

DEFAULT_MEMORY_BYTES = 256 << 20


class EmbeddingMemory:
    """A least-recently-used mapping of piece key -> embeddings, bounded in bytes except for the keys the
    caller protects (the current prompt's)."""

    def __init__(self, max_bytes: int = DEFAULT_MEMORY_BYTES):
        self.max_bytes = max_bytes
        self._entries: OrderedDict[Hashable, np.ndarray] = OrderedDict()
        self.nbytes = 0

    def __getitem__(self, key: Hashable) -> np.ndarray:
        return self._entries[key]

    def __len__(self) -> int:
        return len(self._entries)

    def keys(self) -> list[Hashable]:
        return list(self._entries)

    def get(self, key: Hashable) -> np.ndarray | None:
        value = self._entries.get(key)
        if value is not None:
            self._entries.move_to_end(key)
        return value

    def put(self, key: Hashable, value: np.ndarray) -> None:
        if key in self._entries:
            self.nbytes -= self._entries.pop(key).nbytes
        self._entries[key] = value
        self.nbytes += value.nbytes

    def trim(self, protected: Iterable[Hashable]) -> None:
        """Drop the least recently used unprotected entries until the bound holds (or only protected remain)."""
        keep = set(protected)
        for key in [k for k in self._entries if k not in keep]:
            if self.nbytes <= self.max_bytes:
                return
            self.nbytes -= self._entries.pop(key).nbytes


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
        # Not fsynced: an entry torn by a power cut fails np.load and is only a miss.
        atomic_write(path, lambda f: np.save(f, value), durable=False)
        self._evict()

    def _evict(self) -> None:
        entries = sorted(self.folder.glob("*.npy"), key=lambda p: p.stat().st_mtime)
        total = sum(p.stat().st_size for p in entries)
        for path in entries:
            if total <= self.max_bytes:
                break
            total -= path.stat().st_size
            path.unlink(missing_ok=True)
