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


class VisionError(RuntimeError):
    """The mmproj could not be loaded or an image could not be encoded."""


@dataclass(frozen=True)
class Chunk:
    """One piece of mtmd's tokenization: text token ids, or the embeddings of one image piece."""

    tokens: tuple[int, ...] = ()
    embeddings: np.ndarray | None = None  # [n_tokens, n_embd] for image pieces

    @property
    def is_image(self) -> bool:
        return self.embeddings is not None


class VisionTower:
    """An mmproj loaded next to a language model (mtmd needs the model for its vocabulary and width)."""

    def __init__(self, mmproj: Path, llama_model: ctypes.c_void_p, n_threads: int, *, use_gpu: bool = False):
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

    def tokenize(self, text: str, images: list[Image.Image], *, encode: bool = True) -> list[Chunk]:
        """Split `text` (with one marker per image) into mtmd's chunks; image chunks are encoded."""
        bitmaps = []
        try:
            for image in images:
                rgb = np.ascontiguousarray(np.asarray(image.convert("RGB"), dtype=np.uint8))
                data = rgb.ctypes.data_as(ctypes.POINTER(ctypes.c_uint8))
                bitmaps.append(mtmd.mtmd_bitmap_init(rgb.shape[1], rgb.shape[0], data))
            chunks = mtmd.mtmd_input_chunks_init()
            encoded = text.encode()
            text_input = mtmd.mtmd_input_text(encoded, len(encoded), True, True)
            array = (mtmd.mtmd_bitmap_p_ctypes * len(bitmaps))(*bitmaps)
            status = mtmd.mtmd_tokenize(self._ctx, chunks, ctypes.byref(text_input), array, len(bitmaps))
            if status != 0:
                raise VisionError(f"mtmd could not tokenize the prompt (status {status})")
            try:
                return [self._read_chunk(mtmd.mtmd_input_chunks_get(chunks, i), encode)
                        for i in range(mtmd.mtmd_input_chunks_size(chunks))]
            finally:
                mtmd.mtmd_input_chunks_free(chunks)
        finally:
            for bitmap in bitmaps:
                mtmd.mtmd_bitmap_free(bitmap)

    def _read_chunk(self, chunk: ctypes.c_void_p, encode: bool) -> Chunk:
        n_tokens = mtmd.mtmd_input_chunk_get_n_tokens(chunk)
        if mtmd.mtmd_input_chunk_get_type(chunk) == mtmd.MTMD_INPUT_CHUNK_TYPE_TEXT:
            n = ctypes.c_size_t()
            ids = mtmd.mtmd_input_chunk_get_tokens_text(chunk, ctypes.byref(n))
            return Chunk(tokens=tuple(ids[i] for i in range(n.value)))
        if not encode:
            return Chunk(embeddings=np.empty((n_tokens, 0), dtype=np.float32))
        if mtmd.mtmd_encode_chunk(self._ctx, chunk) != 0:
            raise VisionError("the vision tower failed to encode an image piece")
        out = mtmd.mtmd_get_output_embd(self._ctx)
        flat = np.ctypeslib.as_array(out, shape=(n_tokens * self.n_embd,))
        return Chunk(embeddings=flat.reshape(n_tokens, self.n_embd).copy())
