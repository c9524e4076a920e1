"""The benchmarks' model files: a synthetic checkpoint of a family at a size, converted once with a preset,
kept in one cache every benchmark shares (full-size conversions take minutes and gigabytes)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

CACHE = Path(os.environ.get("MINICPMV_BENCH_CACHE", Path.home() / ".cache" / "minicpmv-edge" / "bench"))


def gguf_dir(family: str, size: str, preset: str = "q4_k_m", *, keep_checkpoint: bool = False) -> Path:
    """The folder holding `family`'s converted pair (made on first use; `.done` marks a complete one). The
    checkpoint is deleted afterwards unless `keep_checkpoint` (a reference run on transformers needs it)."""
    from minicpmv_edge.convert import convert_checkpoint
    from minicpmv_edge.synthetic import make_checkpoint

    out, checkpoint = CACHE / f"{family}-{size}-{preset}", checkpoint_dir(family, size)
    if not (out / ".done").exists():
        if not (checkpoint / "config.json").exists():
            make_checkpoint(family, checkpoint, size=size, seed=0)
        shutil.rmtree(out, ignore_errors=True)
        convert_checkpoint(checkpoint, out, preset)
        (out / ".done").touch()
    if not keep_checkpoint:
        shutil.rmtree(checkpoint, ignore_errors=True)
    return out


def checkpoint_dir(family: str, size: str) -> Path:
    return CACHE / f"checkpoint-{family}-{size}"
