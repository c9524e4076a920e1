"""int4 (GPTQ, AWQ GEMM) checkpoints made from a float synthetic checkpoint, packed with the published
formulas, so the converter's int4 path can be tested without the published int4 releases.

GPTQ: symmetric 4-bit (zero point 8, stored minus one as AutoGPTQ does), optional act-order (a random input
permutation in g_idx). AWQ GEMM: asymmetric 4-bit with zero points, columns interleaved 0,2,4,6,1,3,5,7 in
each int32. Only the language model's projections are quantized, as in the releases (MiniCPM-V 4.6: also
its linear-attention input and output projections; the tiny per-head gates stay float)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Literal

import numpy as np

_LINEAR = re.compile(r"^(llm\.model|model\.language_model)\.layers\.\d+\."
                     r"(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj|linear_attn\.(in_proj_qkv|in_proj_z|out_proj))"
                     r"\.weight$")
_AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)


def _pack(nibbles: np.ndarray) -> np.ndarray:
    """[..., n, 8] values 0..15 -> int32 [..., n], nibble k at bits 4k."""
    words = np.zeros(nibbles.shape[:-1], dtype=np.uint32)
    for k in range(8):
        words |= nibbles[..., k].astype(np.uint32) << np.uint32(4 * k)
    return words.view(np.int32)


def quantize_gptq(weight: np.ndarray, group_size: int, act_order: bool, rng: np.random.Generator) -> dict:
    w = weight.T  # [in, out]
    n_in, n_out = w.shape
    order = rng.permutation(n_in) if act_order else np.arange(n_in)
    g_idx = np.empty(n_in, dtype=np.int32)
    g_idx[order] = np.arange(n_in) // group_size
    groups = n_in // group_size
    scales = np.zeros((groups, n_out), dtype=np.float16)
    for g in range(groups):
        scales[g] = (np.abs(w[g_idx == g]).max(axis=0) * 2 / 15).clip(min=1e-8)
    q = np.clip(np.round(w / scales.astype(np.float32)[g_idx]) + 8, 0, 15)
    zeros = np.full((groups, n_out), 7, dtype=np.uint32)  # zero point 8, stored minus one
    return {"qweight": _pack(q.reshape(n_in // 8, 8, n_out).transpose(0, 2, 1)),
            "qzeros": _pack(zeros.reshape(groups, n_out // 8, 8)), "scales": scales, "g_idx": g_idx}


def quantize_awq(weight: np.ndarray, group_size: int) -> dict:
    w = weight.T  # [in, out]
    n_in, n_out = w.shape
    grouped = w.reshape(n_in // group_size, group_size, n_out)
    low, high = grouped.min(axis=1), grouped.max(axis=1)
    scales = ((high - low) / 15).clip(min=1e-8).astype(np.float16)
    zeros = np.clip(np.round(-low / scales.astype(np.float32)), 0, 15)
    group_of = np.arange(n_in) // group_size
    q = np.clip(np.round(w / scales.astype(np.float32)[group_of]) + zeros[group_of], 0, 15)

    def interleave(values: np.ndarray) -> np.ndarray:
        return values.reshape(values.shape[0], -1, 8)[..., list(_AWQ_ORDER)]

    return {"qweight": _pack(interleave(q)), "qzeros": _pack(interleave(zeros)), "scales": scales}


def make_int4_checkpoint(source: Path, out_dir: Path, method: Literal["gptq", "awq"], group_size: int = 32,
                         act_order: bool = False, seed: int = 0) -> Path:
    """An int4 copy of the float checkpoint `source` (same layout, packed projections, quantization_config)."""
    import torch
    from safetensors.torch import save_file

    from minicpmv_edge.convert.checkpoint import open_checkpoint

    checkpoint = open_checkpoint(Path(source))
    rng = np.random.default_rng(seed)
    tensors: dict[str, torch.Tensor] = {}
    for name in checkpoint.tensors:
        values = checkpoint.read(name)
        if not _LINEAR.match(name):
            tensors[name] = torch.from_numpy(values).to(torch.bfloat16)
            continue
        base = name[: -len("weight")]
        packed = (quantize_gptq(values, group_size, act_order, rng) if method == "gptq"
                  else quantize_awq(values, group_size))
        tensors.update({base + part: torch.from_numpy(np.ascontiguousarray(value)) for part, value in packed.items()})
    checkpoint.close()
    out_dir = Path(out_dir)
    shutil.rmtree(out_dir, ignore_errors=True)
    shutil.copytree(source, out_dir, ignore=shutil.ignore_patterns("*.safetensors", "model.safetensors.index.json"))
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((out_dir / "config.json").read_text())
    config["quantization_config"] = (
        {"quant_method": "gptq", "bits": 4, "group_size": group_size, "desc_act": act_order, "sym": True,
         "checkpoint_format": "gptq"} if method == "gptq" else
        {"quant_method": "awq", "bits": 4, "group_size": group_size, "version": "gemm", "zero_point": True})
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    return out_dir
