"""int4 checkpoints (GPTQ, AWQ GEMM) as converter input: their packed linear layers are dequantized to float32
exactly as the published kernels define the formats, then requantized by the chosen preset in the same pass.

GPTQ (AutoGPTQ / optimum layout, bits 4): `qweight` int32 [in/8, out] holds 8 input rows per word, nibble j
= row 8r + j; `qzeros` int32 [groups, out/8] holds zero points minus one, nibble j = column 8c + j; `scales`
[groups, out]; `g_idx` [in] the group of each input row (any order with act-order). W[o, i] =
scales[g, o] * (q[i, o] - (zeros[g, o] + 1)), g = g_idx[i].

AWQ GEMM (AutoAWQ, bits 4): `qweight` int32 [in, out/8] and `qzeros` int32 [groups, out/8] hold 8 columns per
word in the interleaved order 0, 2, 4, 6, 1, 3, 5, 7; `scales` [groups, out]; groups run along the input
in blocks of group_size. W[o, i] = (q[i, o] - zeros[i // group_size, o]) * scales[i // group_size, o]."""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from .errors import ConversionError

PACKED_PARTS = ("qweight", "qzeros", "scales", "g_idx")
# Nibble k of an AWQ word holds column _AWQ_ORDER[k]; reading nibble _AWQ_REVERSE[c] gives column c.
_AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
_AWQ_REVERSE = tuple(_AWQ_ORDER.index(c) for c in range(8))
_SHIFTS = np.arange(0, 32, 4, dtype=np.uint32)


def _nibbles(packed: np.ndarray) -> np.ndarray:
    """int32 words [..., n] -> their 8 nibbles [..., n, 8] (nibble k = bits 4k..4k+3)."""
    return ((packed.astype(np.uint32)[..., None] >> _SHIFTS) & 0xF).astype(np.int32)


def dequantize_gptq(qweight: np.ndarray, qzeros: np.ndarray, scales: np.ndarray, g_idx: np.ndarray) -> np.ndarray:
    q = _nibbles(qweight.T).reshape(qweight.shape[1], -1).T  # [in, out]
    zeros = _nibbles(qzeros).reshape(qzeros.shape[0], -1) + 1  # [groups, out]
    groups = g_idx.astype(np.int64)
    return (scales.astype(np.float32)[groups] * (q - zeros[groups]).astype(np.float32)).T.copy()


def dequantize_awq(qweight: np.ndarray, qzeros: np.ndarray, scales: np.ndarray, group_size: int) -> np.ndarray:
    q = _nibbles(qweight)[..., list(_AWQ_REVERSE)].reshape(qweight.shape[0], -1)  # [in, out]
    zeros = _nibbles(qzeros)[..., list(_AWQ_REVERSE)].reshape(qzeros.shape[0], -1)
    groups = np.arange(q.shape[0]) // group_size
    return ((q - zeros[groups]).astype(np.float32) * scales.astype(np.float32)[groups]).T.copy()


def quant_method(config: dict[str, Any]) -> dict[str, Any] | None:
    """The checkpoint's int4 quantization config, or None for a float checkpoint."""
    qc = config.get("quantization_config")
    if not qc:
        return None
    method = str(qc.get("quant_method", "")).lower()
    if method not in ("gptq", "awq") or int(qc.get("bits", 4)) != 4:
        raise ConversionError(f"unsupported quantized checkpoint: {method or '?'} with {qc.get('bits')} bits "
                              "(supported: 4-bit GPTQ and AWQ GEMM)")
    if method == "awq" and str(qc.get("version", "gemm")).lower() != "gemm":
        raise ConversionError(f"unsupported AWQ packing {qc.get('version')!r} (supported: gemm)")
    return qc


def packed_shape(method: str, qweight_shape: tuple[int, ...]) -> tuple[int, int]:
    """(out, in) of the float weight a packed qweight stands for."""
    rows, cols = qweight_shape
    return (cols, rows * 8) if method == "gptq" else (cols * 8, rows)


def dequantizer(qc: dict[str, Any], read: Callable[[str], np.ndarray], base: str) -> Callable[[], np.ndarray]:
    """A function producing the float32 [out, in] weight of the packed layer `base` (a name ending in '.')."""
    if qc["quant_method"].lower() == "gptq":
        return lambda: dequantize_gptq(read(base + "qweight"), read(base + "qzeros"), read(base + "scales"),
                                       read(base + "g_idx"))
    group_size = int(qc.get("group_size", 128))
    return lambda: dequantize_awq(read(base + "qweight"), read(base + "qzeros"), read(base + "scales"), group_size)
