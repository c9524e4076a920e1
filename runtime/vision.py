"""Image pieces through llama.cpp's vision tower (the mmproj), via libmtmd.

mtmd tokenizes a prompt with media markers into chunks (text, image pieces); each image chunk is
encoded by clip.cpp and its embeddings are read back as a float32 array, ready to be decoded into the
language model's context."""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from pathlib import Path

import llama_cpp
import numpy as np
from llama_cpp import mtmd_cpp as mtmd
from PIL import Image

from .engine import init_backend


class VisionError(RuntimeError):
    """The mmproj could not be loaded or an image could not be encoded."""


@dataclass(frozen=True)
class Chunk:
    """One piece of mtmd's tokenization: text token ids, or one image piece (its key into the embedding
    cache: the image's digest and the piece's ordinal within that image)."""

    tokens: tuple[int, ...] = ()
    image_key: tuple[str, int] | None = None

    @property
    def is_image(self) -> bool:
        return self.image_key is not None


class VisionTower:
    """An mmproj loaded next to a language model (mtmd needs the model for its vocabulary and width)."""

    def __init__(self, mmproj: Path, llama_model: ctypes.c_void_p, n_threads: int, *, use_gpu: bool = False):
        init_backend()
        params = mtmd.mtmd_context_params_default()
        params.use_gpu = use_gpu
        params.n_threads = n_threads
        params.print_timings = False
        params.warmup = False
        self._ctx = mtmd.mtmd_init_from_file(str(mmproj).encode(), llama_model, params)
        if not self._ctx:
            raise VisionError(f"cannot load the vision tower from {mmproj}")
        self.marker = mtmd.mtmd_default_marker().decode()
        # mtmd requires the projector's output width to equal the language model's embedding width.
        self.n_embd = llama_cpp.llama_model_n_embd(llama_model)

    def close(self) -> None:
        if self._ctx:
            mtmd.mtmd_free(self._ctx)
            self._ctx = None

    def __del__(self) -> None:
        self.close()

    def tokenize(self, text: str, images: list[tuple[str, Image.Image]],
                 cache: dict[tuple[str, int], np.ndarray]) -> list[Chunk]:
        """Split `text` (one marker per image) into mtmd's chunks. Each image is given with its digest;
        pieces not yet in `cache` are encoded and stored there, so history images are never re-encoded."""
        bitmaps = []
        try:
            for digest, image in images:
                rgb = np.ascontiguousarray(np.asarray(image.convert("RGB"), dtype=np.uint8))
                data = rgb.ctypes.data_as(ctypes.POINTER(ctypes.c_uint8))
                bitmap = mtmd.mtmd_bitmap_init(rgb.shape[1], rgb.shape[0], data)
                mtmd.mtmd_bitmap_set_id(bitmap, digest.encode())
                bitmaps.append(bitmap)
            chunks = mtmd.mtmd_input_chunks_init()
            encoded = text.encode()
            text_input = mtmd.mtmd_input_text(encoded, len(encoded), True, True)
            array = (mtmd.mtmd_bitmap_p_ctypes * len(bitmaps))(*bitmaps)
            status = mtmd.mtmd_tokenize(self._ctx, chunks, ctypes.byref(text_input), array, len(bitmaps))
            if status != 0:
                raise VisionError(f"mtmd could not tokenize the prompt (status {status})")
            try:
                out: list[Chunk] = []
                pieces: dict[str, int] = {}
                for i in range(mtmd.mtmd_input_chunks_size(chunks)):
                    chunk = mtmd.mtmd_input_chunks_get(chunks, i)
                    if mtmd.mtmd_input_chunk_get_type(chunk) == mtmd.MTMD_INPUT_CHUNK_TYPE_TEXT:
                        n = ctypes.c_size_t()
                        ids = mtmd.mtmd_input_chunk_get_tokens_text(chunk, ctypes.byref(n))
                        out.append(Chunk(tokens=tuple(ids[j] for j in range(n.value))))
                        continue
                    digest = mtmd.mtmd_input_chunk_get_id(chunk).decode()
                    key = (digest, pieces.get(digest, 0))
                    pieces[digest] = key[1] + 1
                    if key not in cache:
                        cache[key] = self._encode(chunk)
                    out.append(Chunk(image_key=key))
                return out
            finally:
                mtmd.mtmd_input_chunks_free(chunks)
        finally:
            for bitmap in bitmaps:
                mtmd.mtmd_bitmap_free(bitmap)

    def encode_image(self, image: Image.Image) -> list[np.ndarray]:
        """Embeddings of every piece mtmd cuts from one image, in prompt order."""
        cache: dict[tuple[str, int], np.ndarray] = {}
        chunks = self.tokenize(self.marker, [("image", image)], cache)
        return [cache[c.image_key] for c in chunks if c.is_image]

    def _encode(self, chunk: ctypes.c_void_p) -> np.ndarray:
        n_tokens = mtmd.mtmd_input_chunk_get_n_tokens(chunk)
        if mtmd.mtmd_encode_chunk(self._ctx, chunk) != 0:
            raise VisionError("the vision tower failed to encode an image piece")
        out = mtmd.mtmd_get_output_embd(self._ctx)
        flat = np.ctypeslib.as_array(out, shape=(n_tokens * self.n_embd,))
        return flat.reshape(n_tokens, self.n_embd).copy()
