"""Encode image pieces we cut ourselves with llama.cpp's own vision tower (clip.cpp inside libmtmd).

mtmd's public C API only accepts whole images and applies its own slicing. clip.cpp's
`clip_image_encode(clip_ctx *, int, const clip_image_f32 *, std::vector<float> &)` encodes one
preprocessed piece of any size that is a multiple of the patch size, building the same graph mtmd uses
(the resampler's position embeddings follow the piece's own patch grid). libmtmd exports it with C++
linkage, so it is called here by its mangled name (an Itanium C++ ABI name as g++ spells it against
libstdc++: common/platform.py) with the two argument structs laid out as the pinned llama-cpp-python
(0.3.36) compiles them:

- `clip_image_f32` (tools/mtmd/clip-impl.h): bool add_viewsep, bool add_newline, int32 lead_pad,
  anyres_info {int grid_x, grid_y, orig_nx, orig_ny}, std::vector<float> buf, int nx_, int ny_;
- `std::vector<float>` (libstdc++): begin, end, end-of-storage pointers.

clip.cpp copies the input image and writes the output into the vector's existing storage when its size is
right (it never reallocates it), so both structs point into numpy arrays owned here. The tests check this
path against mtmd's own encoding of the same 448x448 piece, so a layout change in a future pin shows up
as a failing test, not as silent garbage.
"""

from __future__ import annotations

import ctypes
from functools import lru_cache

import llama_cpp
import numpy as np
from llama_cpp import mtmd_cpp
from PIL import Image

from minicpmv_edge.common.platform import CLIP_IMAGE_ENCODE as _ENCODE, CLIP_N_OUTPUT_TOKENS as _N_OUTPUT_TOKENS

from .compute import on_compute_thread
from .vision import VisionError

# The llama-cpp-python release whose clip.cpp the two structs below mirror (pyproject.toml pins it).
DECLARED_FOR = "0.3.36"


class _FloatVector(ctypes.Structure):
    _fields_ = [("begin", ctypes.c_void_p), ("end", ctypes.c_void_p), ("capacity_end", ctypes.c_void_p)]


class _ClipImageF32(ctypes.Structure):
    _fields_ = [
        ("add_viewsep", ctypes.c_bool), ("add_newline", ctypes.c_bool), ("lead_pad", ctypes.c_int32),
        ("grid_x", ctypes.c_int), ("grid_y", ctypes.c_int), ("orig_nx", ctypes.c_int), ("orig_ny", ctypes.c_int),
        ("buf", _FloatVector), ("nx", ctypes.c_int), ("ny", ctypes.c_int),
    ]


def _vector_over(array: np.ndarray) -> _FloatVector:
    start = array.ctypes.data
    return _FloatVector(start, start + array.nbytes, start + array.nbytes)


def check_compatible(version: str = llama_cpp.__version__) -> None:
    """Refuse a llama-cpp-python other than the one the struct layouts are declared for: a different
    clip.cpp could read them as something else and crash inside the vision tower."""
    if version != DECLARED_FOR:
        raise VisionError(f"llama-cpp-python {version} is installed, but the vision encoder is built for "
                          f"{DECLARED_FOR}: pip install llama-cpp-python=={DECLARED_FOR}")
    lib = mtmd_cpp._libmtmd
    missing = [name for name in (_ENCODE, _N_OUTPUT_TOKENS) if not hasattr(lib, name)]
    if missing:
        raise VisionError(f"libmtmd of llama-cpp-python {version} lacks {', '.join(missing)}: reinstall "
                          f"llama-cpp-python=={DECLARED_FOR} from source")


@lru_cache(maxsize=1)
def _functions() -> tuple[ctypes._CFuncPtr, ctypes._CFuncPtr]:
    check_compatible()
    lib = mtmd_cpp._libmtmd  # the libmtmd llama-cpp-python already loaded
    encode = getattr(lib, _ENCODE)
    encode.restype = ctypes.c_bool
    encode.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.POINTER(_ClipImageF32), ctypes.POINTER(_FloatVector)]
    n_output = getattr(lib, _N_OUTPUT_TOKENS)
    n_output.restype = ctypes.c_int
    n_output.argtypes = [ctypes.c_void_p, ctypes.POINTER(_ClipImageF32)]
    return encode, n_output


class PieceEncoder:
    """Encodes preprocessed pieces with the vision tower of an mtmd context."""

    def __init__(self, mtmd_context: ctypes.c_void_p, n_embd: int, n_threads: int, mean: tuple[float, ...],
                 std: tuple[float, ...], patch_size: int):
        # mtmd_context's first member is its vision clip_ctx (tools/mtmd/mtmd.cpp, struct mtmd_context).
        self._clip = ctypes.cast(mtmd_context, ctypes.POINTER(ctypes.c_void_p))[0]
        if not self._clip:
            raise VisionError("the mmproj has no vision tower")
        self.n_embd, self.n_threads, self.patch_size = n_embd, n_threads, patch_size
        self._mean = np.asarray(mean, dtype=np.float32)
        self._std = np.asarray(std, dtype=np.float32)
        self._encode, self._n_output = _functions()

    def encode(self, piece: Image.Image) -> np.ndarray:
        """[n_tokens, n_embd] embeddings of one RGB piece whose sides are multiples of the patch size."""
        width, height = piece.size
        if width % self.patch_size or height % self.patch_size:
            raise VisionError(f"piece of {width}x{height} is not a multiple of the {self.patch_size}-pixel patch")
        pixels = np.asarray(piece.convert("RGB"), dtype=np.float32) / np.float32(255.0)
        pixels = np.ascontiguousarray((pixels - self._mean) / self._std, dtype=np.float32)
        image = _ClipImageF32(nx=width, ny=height, buf=_vector_over(pixels))
        n_tokens = self._n_output(self._clip, ctypes.byref(image))
        out = np.empty((n_tokens, self.n_embd), dtype=np.float32)
        vector = _vector_over(out)
        if not on_compute_thread(self._encode, self._clip, self.n_threads, ctypes.byref(image), ctypes.byref(vector)):
            raise VisionError(f"the vision tower failed to encode a {width}x{height} image piece")
        return out
