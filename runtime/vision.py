"""llama.cpp's vision tower (the mmproj) loaded through libmtmd, next to the language model."""

from __future__ import annotations

import ctypes
from pathlib import Path

import llama_cpp
import numpy as np
from llama_cpp import mtmd_cpp as mtmd
from PIL import Image

from .compute import on_compute_thread
from .engine import init_backend


class VisionError(RuntimeError):
    """The mmproj could not be loaded or an image could not be encoded."""


class VisionTower:
    """An mmproj loaded next to a language model (mtmd needs the model for its vocabulary and width)."""

    def __init__(self, mmproj: Path, llama_model: ctypes.c_void_p, n_threads: int, *, use_gpu: bool = False):
        self._ctx = None  # close() reads it: set before anything can raise, so a failed load cleans up silently
        init_backend()
        params = mtmd.mtmd_context_params_default()
        params.use_gpu = use_gpu
        params.n_threads = n_threads
        params.print_timings = False
        params.warmup = False
        # clip.cpp resolves "auto" only during warmup (skipped: it costs a full encode at load), which leaves
        # flash attention off. On: one 448x448 piece of the full-size SigLIP tower encodes in 3.25 s instead
        # of 4.0 s (F16 mmproj, 2 AVX2 cores), embeddings within cosine 0.9999995 of the unfused graph.
        params.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED
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

    @property
    def context(self) -> ctypes.c_void_p:
        return self._ctx

    def encode_image(self, image: Image.Image) -> list[np.ndarray]:
        """Embeddings of every piece mtmd itself cuts from one image, in prompt order (mtmd's own layout;
        the runtime cuts pieces the official way instead, see `slicing`)."""
        rgb = np.ascontiguousarray(np.asarray(image.convert("RGB"), dtype=np.uint8))
        bitmap = mtmd.mtmd_bitmap_init(rgb.shape[1], rgb.shape[0], rgb.ctypes.data_as(ctypes.POINTER(ctypes.c_uint8)))
        chunks = mtmd.mtmd_input_chunks_init()
        try:
            marker = self.marker.encode()
            text = mtmd.mtmd_input_text(marker, len(marker), True, True)
            bitmaps = (mtmd.mtmd_bitmap_p_ctypes * 1)(bitmap)
            if mtmd.mtmd_tokenize(self._ctx, chunks, ctypes.byref(text), bitmaps, 1) != 0:
                raise VisionError("mtmd could not preprocess the image")
            out = []
            for i in range(mtmd.mtmd_input_chunks_size(chunks)):
                chunk = mtmd.mtmd_input_chunks_get(chunks, i)
                if mtmd.mtmd_input_chunk_get_type(chunk) == mtmd.MTMD_INPUT_CHUNK_TYPE_TEXT:
                    continue
                n_tokens = mtmd.mtmd_input_chunk_get_n_tokens(chunk)
                if on_compute_thread(mtmd.mtmd_encode_chunk, self._ctx, chunk) != 0:
                    raise VisionError("the vision tower failed to encode an image piece")
                flat = np.ctypeslib.as_array(mtmd.mtmd_get_output_embd(self._ctx), shape=(n_tokens * self.n_embd,))
                out.append(flat.reshape(n_tokens, self.n_embd).copy())
            return out
        finally:
            mtmd.mtmd_input_chunks_free(chunks)
            mtmd.mtmd_bitmap_free(bitmap)
