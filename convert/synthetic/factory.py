"""`make_checkpoint`: one generic writer for every family in `families.SPECS`."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Literal, Mapping

from .families import TINY, Family, get_family, longrope_factors
from . import minicpmv4_6
from .minicpmv4_6 import MERGER_FAMILIES
from .files import render, write_json
from .tokenizer import build_tokenizer
from .weights import Entry, assign_shards, plan_from_dims, write_safetensors

Size = Literal["tiny", "full"]
VOCAB_PAD = 64   # published vocab sizes are padded too; tiny ones round len(tokenizer) up to this


def dims(family: str, size: Size = "tiny", overrides: Mapping[str, int] | None = None) -> dict[str, Any]:
    """Concrete numbers behind every ``$name`` placeholder of the family's templates. `overrides` replaces
    some of them (e.g. ``{"hidden": 4096, "layers": 1}``: a tiny model with a published embedding width)."""
    fam = get_family(family)
    tok_size = build_tokenizer(family).size
    if size == "tiny":
        d: dict[str, Any] = {**fam.full, **TINY, **fam.tiny, "vocab": -(-tok_size // VOCAB_PAD) * VOCAB_PAD}
        if "head_dim" not in fam.full:
            d.pop("head_dim")    # families whose config has no head_dim key derive it from hidden/heads
    elif size == "full":
        d = dict(fam.full)
        if d["vocab"] < tok_size:
            raise ValueError(f"{family}: tokenizer ({tok_size}) exceeds the published vocab_size {d['vocab']}")
    else:
        raise ValueError(f"size must be 'tiny' or 'full', not {size!r}")
    unknown = sorted(set(overrides or {}) - set(d) - {"head_dim"})
    if unknown:
        raise ValueError(f"{family}: no such dimension to override: {', '.join(unknown)}")
    d.update(overrides or {})
    d["longrope"] = longrope_factors(d.get("head_dim") or d["hidden"] // d["heads"])
    return d


def plan_tensors(family: str, size: Size = "tiny") -> list[Entry]:
    """Every (name, shape) the checkpoint holds, in write order; no data is generated."""
    return plan_from_dims(get_family(family), dims(family, size))


def _write_into(folder: Path, fam: Family, size: Size, seed: int,
                overrides: Mapping[str, int] | None = None) -> None:
    d = dims(fam.key, size, overrides)
    tok = build_tokenizer(fam.key)
    write_json(folder / "config.json", render(fam.config, d, tok.vocab))
    write_json(folder / "generation_config.json", render(fam.generation_config, d, tok.vocab))
    write_json(folder / "preprocessor_config.json", fam.preprocessor_config)
    for name, content in tok.files.items():
        (folder / name).write_bytes(content)

    entries = plan_from_dims(fam, d)
    shards = assign_shards(entries, n_shards=2 if size == "tiny" else None)
    weight_map: dict[str, str] = {}
    total = 0
    for i, shard in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        total += write_safetensors(folder / fname, shard, seed)
        weight_map.update((name, fname) for name, _ in shard)
    write_json(folder / "model.safetensors.index.json", {"metadata": {"total_size": total}, "weight_map": weight_map})


def make_checkpoint(family: str, out_dir: str | os.PathLike[str], size: Size = "tiny", seed: int = 0,
                    overrides: Mapping[str, int] | None = None) -> Path:
    """Write a random-weight checkpoint of `family` in its published Hugging Face layout.

    `family` is one of `FAMILIES` (resampler families, written here) or `MERGER_FAMILIES`
    (MiniCPM-V 4.6, built by transformers itself: `minicpmv4_6.py`, needs the `test` extra).
    The folder is assembled beside `out_dir` and renamed into place, so readers never see a
    half-written checkpoint; an existing `out_dir` is replaced. `overrides` (resampler families only)
    replaces some of the size's dimensions: see `dims`.
    """
    if family in MERGER_FAMILIES:
        if overrides:
            raise ValueError(f"{family}: overrides apply to the resampler families only")
        def write(tmp: Path) -> None:
            minicpmv4_6.write_into(tmp, family, size, seed)
    else:
        fam = get_family(family)

        def write(tmp: Path) -> None:
            _write_into(tmp, fam, size, seed, overrides)
    if size not in ("tiny", "full"):
        raise ValueError(f"size must be 'tiny' or 'full', not {size!r}")
    out = Path(out_dir).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        write(tmp)
        tmp.chmod(0o755)   # mkdtemp makes it 0700
        if out.exists():
            # rename() cannot replace a non-empty directory: move the old one aside first.
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
            os.replace(out, old / "x")
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
