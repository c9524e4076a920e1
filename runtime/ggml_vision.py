"""ggml's C API through ctypes: the few functions a vision graph needs, from the ggml shared libraries that ship
with llama-cpp-python (the same libraries llama.cpp and clip.cpp run on).

`GgufWeights` loads a GGUF's tensors into one CPU backend buffer in their stored types (as clip.cpp loads an
mmproj), `Graph` builds a compute graph op by op and runs it on the CPU backend with a graph allocator.
ggml aborts the process on a failed GGML_ASSERT, so callers check shapes in Python before building (every
tensor's `ne` is readable here).
"""

from __future__ import annotations

import ctypes
from functools import lru_cache
from pathlib import Path
from typing import Any

import llama_cpp
import numpy as np

from minicpmv_edge.common.platform import shared_library

from .compute import on_compute_thread
from .vision import VisionError

# enum ggml_type / ggml_prec values of the pinned ggml (ggml/include/ggml.h)
GGML_TYPE_F32, GGML_TYPE_F16, GGML_TYPE_I32 = 0, 1, 26
GGML_PREC_F32 = 10
GGML_MAX_DIMS = 4
# clip.cpp's node budget for one vision graph (clip_ctx::max_nodes)
MAX_NODES = 8192

_p = ctypes.c_void_p
_i64, _f32, _int, _bool, _size = ctypes.c_int64, ctypes.c_float, ctypes.c_int, ctypes.c_bool, ctypes.c_size_t


class GgmlError(VisionError):
    """ggml could not load a file, allocate a graph or compute it."""


class _InitParams(ctypes.Structure):
    _fields_ = [("mem_size", _size), ("mem_buffer", _p), ("no_alloc", _bool)]


class _GgufInitParams(ctypes.Structure):
    _fields_ = [("no_alloc", _bool), ("ctx", ctypes.POINTER(_p))]


class _TensorHead(ctypes.Structure):
    """The leading members of struct ggml_tensor (type, buffer, ne, nb): enough to read a shape."""
    _fields_ = [("type", _int), ("buffer", _p), ("ne", _i64 * GGML_MAX_DIMS), ("nb", _size * GGML_MAX_DIMS)]


_T = _p  # struct ggml_tensor *
# name -> (library, restype, argtypes)
_SIGNATURES: dict[str, tuple[str, Any, list[Any]]] = {
    "ggml_init": ("ggml-base", _p, [_InitParams]),
    "ggml_free": ("ggml-base", None, [_p]),
    "ggml_tensor_overhead": ("ggml-base", _size, []),
    "ggml_graph_overhead_custom": ("ggml-base", _size, [_size, _bool]),
    "ggml_new_graph_custom": ("ggml-base", _p, [_p, _size, _bool]),
    "ggml_build_forward_expand": ("ggml-base", None, [_p, _T]),
    "ggml_get_tensor": ("ggml-base", _T, [_p, ctypes.c_char_p]),
    "ggml_nbytes": ("ggml-base", _size, [_T]),
    "ggml_new_tensor_1d": ("ggml-base", _T, [_p, _int, _i64]),
    "ggml_new_tensor_2d": ("ggml-base", _T, [_p, _int, _i64, _i64]),
    "ggml_new_tensor_4d": ("ggml-base", _T, [_p, _int, _i64, _i64, _i64, _i64]),
    "ggml_set_input": ("ggml-base", None, [_T]),
    "ggml_set_output": ("ggml-base", None, [_T]),
    "ggml_add": ("ggml-base", _T, [_p, _T, _T]),
    "ggml_mul": ("ggml-base", _T, [_p, _T, _T]),
    "ggml_mul_mat": ("ggml-base", _T, [_p, _T, _T]),
    "ggml_norm": ("ggml-base", _T, [_p, _T, _f32]),
    "ggml_gelu": ("ggml-base", _T, [_p, _T]),
    "ggml_get_rows": ("ggml-base", _T, [_p, _T, _T]),
    "ggml_cast": ("ggml-base", _T, [_p, _T, _int]),
    "ggml_cont": ("ggml-base", _T, [_p, _T]),
    "ggml_transpose": ("ggml-base", _T, [_p, _T]),
    "ggml_reshape_2d": ("ggml-base", _T, [_p, _T, _i64, _i64]),
    "ggml_reshape_3d": ("ggml-base", _T, [_p, _T, _i64, _i64, _i64]),
    "ggml_reshape_4d": ("ggml-base", _T, [_p, _T, _i64, _i64, _i64, _i64]),
    "ggml_permute": ("ggml-base", _T, [_p, _T, _int, _int, _int, _int]),
    "ggml_conv_2d": ("ggml-base", _T, [_p, _T, _T, _int, _int, _int, _int, _int, _int]),
    "ggml_flash_attn_ext": ("ggml-base", _T, [_p, _T, _T, _T, _T, _f32, _f32, _f32]),
    "ggml_prec_set_acc": ("ggml-base", _bool, [_T, _int]),
    "gguf_init_from_file": ("ggml-base", _p, [ctypes.c_char_p, _GgufInitParams]),
    "gguf_free": ("ggml-base", None, [_p]),
    "gguf_get_n_tensors": ("ggml-base", _i64, [_p]),
    "gguf_get_tensor_name": ("ggml-base", ctypes.c_char_p, [_p, _i64]),
    "gguf_get_tensor_offset": ("ggml-base", _size, [_p, _i64]),
    "gguf_get_data_offset": ("ggml-base", _size, [_p]),
    "ggml_backend_get_default_buffer_type": ("ggml-base", _p, [_p]),
    "ggml_backend_alloc_ctx_tensors_from_buft": ("ggml-base", _p, [_p, _p]),
    "ggml_backend_buffer_free": ("ggml-base", None, [_p]),
    "ggml_backend_free": ("ggml-base", None, [_p]),
    "ggml_backend_tensor_set": ("ggml-base", None, [_T, _p, _size, _size]),
    "ggml_backend_tensor_get": ("ggml-base", None, [_T, _p, _size, _size]),
    "ggml_backend_graph_compute": ("ggml-base", _int, [_p, _p]),
    "ggml_gallocr_new": ("ggml-base", _p, [_p]),
    "ggml_gallocr_free": ("ggml-base", None, [_p]),
    "ggml_gallocr_alloc_graph": ("ggml-base", _bool, [_p, _p]),
    "ggml_backend_cpu_init": ("ggml-cpu", _p, []),
    "ggml_backend_cpu_set_n_threads": ("ggml-cpu", None, [_p, _int]),
}


class _Api:
    """The bound functions, as attributes without the `ggml_` prefix (`api.mul_mat`, `api.gguf_free`)."""

    def __init__(self) -> None:
        folder = Path(llama_cpp.__file__).parent / "lib"
        # the libraries libllama already loaded: dlopen hands back the same handles (one ggml per process)
        libs = {name: ctypes.CDLL(str(shared_library(folder, name))) for name in ("ggml-base", "ggml-cpu")}
        for name, (lib, restype, argtypes) in _SIGNATURES.items():
            function = getattr(libs[lib], name)
            function.restype, function.argtypes = restype, argtypes
            setattr(self, name.removeprefix("ggml_"), function)


@lru_cache(maxsize=1)
def api() -> _Api:
    return _Api()


def shape(tensor: int) -> tuple[int, ...]:
    """ne[0..3] of a ggml tensor."""
    return tuple(ctypes.cast(tensor, ctypes.POINTER(_TensorHead)).contents.ne)


class CpuBackend:
    """ggml's CPU backend with a thread count."""

    def __init__(self, n_threads: int) -> None:
        self.handle = api().backend_cpu_init()
        if not self.handle:
            raise GgmlError("ggml's CPU backend did not start")
        api().backend_cpu_set_n_threads(self.handle, int(n_threads))

    def close(self) -> None:
        if self.handle:
            api().backend_free(self.handle)
            self.handle = None


class GgufWeights:
    """Every tensor of a GGUF file in one buffer of `backend`, in the file's own types."""

    def __init__(self, path: Path | str, backend: CpuBackend) -> None:
        lib = api()
        self.context, self.buffer = _p(), None
        gguf = lib.gguf_init_from_file(str(path).encode(), _GgufInitParams(True, ctypes.pointer(self.context)))
        if not gguf:
            raise GgmlError(f"ggml cannot read {path} as GGUF")
        try:
            self.buffer = lib.backend_alloc_ctx_tensors_from_buft(
                self.context, lib.backend_get_default_buffer_type(backend.handle))
            if not self.buffer:
                raise GgmlError(f"no memory for the tensors of {path}")
            data = np.memmap(path, dtype=np.uint8, mode="r")
            start = lib.gguf_get_data_offset(gguf)
            for i in range(lib.gguf_get_n_tensors(gguf)):
                tensor = lib.get_tensor(self.context, lib.gguf_get_tensor_name(gguf, i))
                offset = start + lib.gguf_get_tensor_offset(gguf, i)
                size = lib.nbytes(tensor)
                chunk = np.ascontiguousarray(data[offset:offset + size])
                lib.backend_tensor_set(tensor, chunk.ctypes.data, 0, size)
            del data
        except BaseException:
            self.close()
            raise
        finally:
            lib.gguf_free(gguf)

    def get(self, name: str) -> int | None:
        return api().get_tensor(self.context, name.encode()) or None

    def close(self) -> None:
        if self.buffer:
            api().backend_buffer_free(self.buffer)
            self.buffer = None
        if self.context:
            api().free(self.context)
            self.context = _p()


def graph_memory() -> ctypes.Array:
    """Memory for the metadata of one graph of up to MAX_NODES nodes (reusable once the graph is closed)."""
    lib = api()
    return ctypes.create_string_buffer(MAX_NODES * lib.tensor_overhead() + lib.graph_overhead_custom(MAX_NODES, False))


class Graph:
    """One compute graph in a metadata-only context over `memory` (`graph_memory()`): add ops
    (`graph.op("mul_mat", w, x)`) and inputs, then `run` allocates it with an allocator, copies the inputs in
    and computes."""

    def __init__(self, memory: ctypes.Array) -> None:
        lib = api()
        self.ctx = lib.init(_InitParams(ctypes.sizeof(memory), ctypes.cast(memory, _p), True))
        if not self.ctx:
            raise GgmlError("ggml_init failed")
        self.graph = lib.new_graph_custom(self.ctx, MAX_NODES, False)
        self.inputs: dict[str, tuple[int, np.dtype]] = {}

    def op(self, name: str, *args: Any) -> int:
        return getattr(api(), name)(self.ctx, *args)

    def input(self, name: str, dtype: type, *ne: int) -> int:
        ggml_type = {np.float32: GGML_TYPE_F32, np.int32: GGML_TYPE_I32}[dtype]
        maker = {1: "new_tensor_1d", 2: "new_tensor_2d", 4: "new_tensor_4d"}[len(ne)]
        tensor = self.op(maker, ggml_type, *ne)
        api().set_input(tensor)
        self.inputs[name] = (tensor, np.dtype(dtype))
        return tensor

    def run(self, output: int, backend: CpuBackend, allocator: int, values: dict[str, np.ndarray]) -> np.ndarray:
        """Compute `output` (float32) with `values` for every input (C-order arrays whose reversed shape is the
        tensor's ne) -> an array of the output's reversed ne (trailing 1s of ne dropped)."""
        lib = api()
        lib.set_output(output)
        lib.build_forward_expand(self.graph, output)
        if not lib.gallocr_alloc_graph(allocator, self.graph):
            raise GgmlError("ggml could not allocate the vision graph")
        for name, (tensor, dtype) in self.inputs.items():  # after allocation: gallocr reuses memory
            value = np.ascontiguousarray(values[name], dtype=dtype)
            if value.nbytes != lib.nbytes(tensor):
                raise GgmlError(f"input {name}: {value.nbytes} bytes for a {lib.nbytes(tensor)}-byte tensor")
            lib.backend_tensor_set(tensor, value.ctypes.data, 0, value.nbytes)
        if on_compute_thread(lib.backend_graph_compute, backend.handle, self.graph) != 0:
            raise GgmlError("ggml failed to compute the vision graph")
        ne = list(shape(output))
        while len(ne) > 1 and ne[-1] == 1:
            ne.pop()
        out = np.empty(ne[::-1], dtype=np.float32)
        lib.backend_tensor_get(output, out.ctypes.data, 0, out.nbytes)
        return out

    def close(self) -> None:
        if self.ctx:
            api().free(self.ctx)
            self.ctx = None


class Allocator:
    """A graph allocator on the CPU backend's buffer type (its buffer grows to the largest graph run)."""

    def __init__(self, backend: CpuBackend) -> None:
        self.handle = api().gallocr_new(api().backend_get_default_buffer_type(backend.handle))
        if not self.handle:
            raise GgmlError("ggml_gallocr_new failed")

    def close(self) -> None:
        if self.handle:
            api().gallocr_free(self.handle)
            self.handle = None
