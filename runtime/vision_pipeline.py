"""Image pieces -> embeddings: llama.cpp's vision tower (the mmproj through libmtmd), the encoder that feeds
it pieces we cut ourselves, and the two caches in front of it (bounded memory, optional disk)."""

from __future__ import annotations

import ctypes
import time
from pathlib import Path
from typing import Any, Callable, Hashable, Iterable

import numpy as np
from PIL import Image

from .clip_encoder import PieceEncoder
from .embedding_cache import DEFAULT_MEMORY_BYTES, EmbeddingCache, EmbeddingMemory
from .slicing import SliceLayout, plan_slices
from .vision import VisionTower


class VisionPipeline:
    def __init__(self, mmproj_path: Path, projector: dict[str, Any], llama_model: ctypes.c_void_p, n_embd: int,
                 n_threads: int, memory_bytes: int = DEFAULT_MEMORY_BYTES):
        self.tower = VisionTower(mmproj_path, llama_model, n_threads)
        self.mmproj_path, self.n_threads = mmproj_path, n_threads
        self.video_encoder: Any = None  # the 3D resampler's encoder (video_encoder.py), built on first use
        patch_size = int(projector.get("clip.vision.patch_size", 14))
        try:
            self.encoder = PieceEncoder(self.tower.context, n_embd, n_threads,
                                        tuple(projector.get("clip.vision.image_mean", (0.5, 0.5, 0.5))),
                                        tuple(projector.get("clip.vision.image_std", (0.5, 0.5, 0.5))), patch_size)
        except BaseException:
            self.tower.close()  # the Model never holds a half-built pipeline, so it cannot close this one
            raise
        # MiniCPM-V 4.6's merger folds merge x merge patches into one token, so pieces align to that.
        merge = int(projector.get("clip.vision.projector.scale_factor", 1)) \
            if projector.get("clip.projector_type") == "minicpmv4_6" else 1
        self.piece_align = patch_size * merge
        self.memory = EmbeddingMemory(memory_bytes)
        self.disk_cache: EmbeddingCache | None = None  # set by batch jobs that rerun over the same images

    def close(self) -> None:
        if self.video_encoder is not None:
            self.video_encoder.close()
        self.tower.close()

    def layout(self, size: tuple[int, int], max_slice_nums: int, small_image_upsize: str = "always",
               image: Image.Image | None = None) -> SliceLayout:
        """The image's pieces; "adaptive" lays them out from `image`'s content."""
        return plan_slices(size, max_slice_nums, self.piece_align, small_image_upsize, image)

    def embeddings(self, key: Hashable, piece: Callable[[], Image.Image]) -> tuple[np.ndarray, float]:
        """The piece's embeddings from memory, the disk cache or the vision tower (`piece()` cuts it only
        then), and the seconds spent encoding."""
        return self._cached(key, lambda: self.encoder.encode(piece()))

    def group_embeddings(self, key: Hashable, pieces: Callable[[], list[Image.Image]],
                         temporal_ids: list[int]) -> tuple[np.ndarray, float]:
        """One 3D-resampler block for a group of same-size pieces (one per frame, `pieces()` cuts them only
        when no cache holds the block), and the seconds spent encoding."""
        def encode() -> np.ndarray:
            if self.video_encoder is None:
                from .video_encoder import VideoEncoder

                self.video_encoder = VideoEncoder(self.mmproj_path, self.n_threads)
            return self.video_encoder.encode_group(pieces(), temporal_ids)

        return self._cached(key, encode)

    def _cached(self, key: Hashable, encode: Callable[[], np.ndarray]) -> tuple[np.ndarray, float]:
        found = self.memory.get(key)
        if found is None and self.disk_cache is not None:
            found = self.disk_cache.get(key)
        seconds = 0.0
        if found is None:
            started = time.perf_counter()
            found = encode()
            seconds = time.perf_counter() - started
            if self.disk_cache is not None:
                self.disk_cache.put(key, found)
        self.memory.put(key, found)
        return found, seconds

    def keep_only(self, protected: Iterable[Hashable]) -> None:
        """Bound the memory again, keeping what the current prompt uses."""
        self.memory.trim(protected)
