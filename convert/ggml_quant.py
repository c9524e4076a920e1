"""ggml's own quantizer, called through ctypes from the libggml-base that llama-cpp-python installs.

Quantizing with ggml itself (rather than a Python port) is what makes our tensors byte-identical to what
`llama-quantize` writes. ctypes releases the GIL around foreign calls, so row chunks quantize in parallel.
"""

from __future__ import annotations

import ctypes
import importlib.util
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from minicpmv_edge.common.platform import shared_library
from minicpmv_edge.common.system import default_threads

# A chunk of this many source bytes keeps both cores busy without holding large temporaries.
_CHUNK_BYTES = 32 << 20


@lru_cache(maxsize=1)
def _libggml() -> ctypes.CDLL:
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("llama-cpp-python is not installed; it provides ggml's quantizer")
    lib_dir = Path(next(iter(spec.submodule_search_locations))) / "lib"
    lib = ctypes.CDLL(str(shared_library(lib_dir, "ggml-base")))
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [
        ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p,
        ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p,
    ]
    lib.ggml_quantize_requires_imatrix.restype = ctypes.c_bool
    lib.ggml_quantize_requires_imatrix.argtypes = [ctypes.c_int]
    lib.ggml_quantize_init.restype = None
    lib.ggml_quantize_init.argtypes = [ctypes.c_int]
    for name in ("ggml_bf16_to_fp32_row", "ggml_fp16_to_fp32_row"):
        getattr(lib, name).restype = None
        getattr(lib, name).argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
    return lib


def half_to_float32(source: np.ndarray, dtype: str) -> np.ndarray:
    """bf16 (stored as uint16) or f16 values to float32 with ggml's vectorised row converters: one pass,
    no temporaries, and the GIL is released while it runs."""
    converter = {"BF16": "ggml_bf16_to_fp32_row", "F16": "ggml_fp16_to_fp32_row"}[dtype]
    src = np.ascontiguousarray(source)
    out = np.empty(src.shape, dtype=np.float32)
    getattr(_libggml(), converter)(src.ctypes.data, out.ctypes.data, src.size)
    return out


def block_size(qtype: GGMLQuantizationType) -> int:
    return GGML_QUANT_SIZES[qtype][0]


def row_nbytes(qtype: GGMLQuantizationType, n_per_row: int) -> int:
    block, type_size = GGML_QUANT_SIZES[qtype]
    if n_per_row % block:
        raise ValueError(f"a row of {n_per_row} values does not fit {qtype.name} blocks of {block}")
    return n_per_row // block * type_size


def quantize(data: np.ndarray, qtype: GGMLQuantizationType, n_threads: int | None = None) -> np.ndarray:
    """Convert float32 `data` (rows along the last axis) to `qtype` with ggml; returns the raw bytes as uint8
    with shape (..., row_bytes). F32 is returned unchanged (as float32)."""
    if qtype == GGMLQuantizationType.F32:
        return np.ascontiguousarray(data, dtype=np.float32)
    src = np.ascontiguousarray(data, dtype=np.float32)
    n_per_row = src.shape[-1]
    n_rows = src.size // n_per_row
    row_bytes = row_nbytes(qtype, n_per_row)
    out = np.empty((*src.shape[:-1], row_bytes), dtype=np.uint8)
    lib = _libggml()
    if lib.ggml_quantize_requires_imatrix(int(qtype)):
        raise ValueError(f"{qtype.name} needs an importance matrix, which this converter does not compute")
    lib.ggml_quantize_init(int(qtype))  # not thread-safe inside ggml_quantize_chunk's lazy init

    src_ptr, dst_ptr = src.ctypes.data, out.ctypes.data
    rows_per_chunk = max(1, _CHUNK_BYTES // (4 * n_per_row))

    def run(first_row: int) -> int:
        n = min(rows_per_chunk, n_rows - first_row)
        return lib.ggml_quantize_chunk(int(qtype), src_ptr, dst_ptr, first_row * n_per_row, n, n_per_row, None)

    starts = range(0, n_rows, rows_per_chunk)
    threads = min(n_threads or default_threads(), len(starts))
    if threads <= 1:
        written = sum(run(s) for s in starts)
    else:
        with ThreadPoolExecutor(threads) as pool:
            written = sum(pool.map(run, starts))
    if written != out.nbytes:
        raise RuntimeError(f"ggml wrote {written} bytes for a {qtype.name} tensor of {out.nbytes}")
    return out
