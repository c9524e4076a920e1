"""Streaming GGUF output: the whole plan (metadata, tensor names, shapes, types) is known before any weight
is read, so the header is written first and tensors follow one row block at a time. The caller writes each
file under a partial name and renames it only when complete (common/files.py's atomic_path)."""

from __future__ import annotations

import shutil
import threading
from dataclasses import dataclass
from pathlib import Path
from queue import Empty, Queue
from typing import Callable, Iterator, Sequence

import numpy as np
from gguf import GGUFWriter
from gguf import GGMLQuantizationType as T

from .errors import ConversionError
from .ggml_quant import quantize, row_nbytes

# A tensor's GGUF name, shape, and the source of its values (row blocks, or the whole tensor at once).
SourcedTensor = tuple[str, tuple[int, ...], Callable[[], Iterator[np.ndarray]]]


@dataclass
class PlannedTensor:
    name: str
    shape: tuple[int, ...]  # numpy order: rows first, values of a row last
    qtype: T
    blocks: Callable[[], Iterator[np.ndarray]]  # float32 row blocks that together make the tensor

    @property
    def nbytes(self) -> int:
        n_rows = int(np.prod(self.shape[:-1])) if len(self.shape) > 1 else 1
        return n_rows * row_nbytes(self.qtype, self.shape[-1])


@dataclass
class GgufPlan:
    arch: str
    metadata: Callable[[GGUFWriter], None]
    tensors: list[PlannedTensor]

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)


def prefetched(blocks: Iterator[np.ndarray], depth: int = 2) -> Iterator[np.ndarray]:
    """Read and convert the next row blocks on a helper thread while the current one quantizes: ggml's
    bf16 -> f32 conversion and the page-ins release the GIL, so the cores do not wait for them."""
    queue: Queue = Queue(maxsize=depth)
    done = object()
    stop = threading.Event()

    def produce() -> None:
        try:
            for block in blocks:
                if stop.is_set():
                    return
                queue.put(block)
            queue.put(done)
        except BaseException as e:  # noqa: BLE001 - re-raised in the consumer
            queue.put(e)

    worker = threading.Thread(target=produce, daemon=True)
    worker.start()
    try:
        while (item := queue.get()) is not done:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        while worker.is_alive():
            try:
                queue.get_nowait()
            except Empty:
                worker.join(timeout=0.05)


class _StreamedTensor:
    """Quacks like the ndarray GGUFWriter.write_tensor_data expects, but produces its bytes block by block."""

    def __init__(self, tensor: PlannedTensor, n_threads: int, on_block: Callable[[int], None]):
        self.tensor, self.n_threads, self.on_block = tensor, n_threads, on_block
        self.nbytes = tensor.nbytes

    def tofile(self, fout) -> None:  # noqa: ANN001 - a binary file object
        written = 0
        for block in prefetched(self.tensor.blocks()):
            out = quantize(block.reshape(-1, self.tensor.shape[-1]), self.tensor.qtype, self.n_threads)
            if self.tensor.qtype != T.F32 and out.dtype != np.uint8:
                raise AssertionError("quantizer returned floats for a quantized type")
            out.tofile(fout)
            written += out.nbytes
            self.on_block(block.size)
        if written != self.nbytes:
            raise ConversionError(f"{self.tensor.name}: wrote {written} bytes, planned {self.nbytes}")


def _tensor_info(writer: GGUFWriter, tensor: PlannedTensor) -> None:
    if tensor.qtype == T.F32:
        writer.add_tensor_info(tensor.name, tensor.shape, np.dtype(np.float32), tensor.nbytes)
        return
    byte_shape = (*tensor.shape[:-1], row_nbytes(tensor.qtype, tensor.shape[-1]))
    writer.add_tensor_info(tensor.name, byte_shape, np.dtype(np.uint8), tensor.nbytes, raw_dtype=tensor.qtype)


def check_free_space(folder: Path, needed: int) -> None:
    free = shutil.disk_usage(folder).free
    if free < needed:
        raise ConversionError(f"not enough disk space in {folder}: {needed / 2**30:.2f} GiB needed, "
                              f"{free / 2**30:.2f} GiB free")


def write_gguf(plan: GgufPlan, partial: Path, n_threads: int, on_block: Callable[[int], None]) -> None:
    """Write `plan` to `partial`, the partial name the caller fsyncs and renames (or removes on a failure)."""
    writer = GGUFWriter(partial, plan.arch)
    try:
        plan.metadata(writer)
        for tensor in plan.tensors:
            _tensor_info(writer, tensor)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for tensor in plan.tensors:
            writer.write_tensor_data(_StreamedTensor(tensor, n_threads, on_block))  # type: ignore[arg-type]
    finally:
        writer.close()


def value_count(tensors: Sequence[PlannedTensor]) -> int:
    return sum(int(np.prod(t.shape)) for t in tensors)
