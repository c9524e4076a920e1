"""`make_checkpoint`: one entry for every family in the registry that declares a synthetic checkpoint
(`Family.synthetic`), and for their synthetic variants (`CheckpointSpec.variants`, e.g. MiniCPM-V
4.6-Thinking). The spec's `builder` names the code that writes it: `BUILDERS` below, the one place names
map to functions."""

from __future__ import annotations

import dataclasses
import functools
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Literal, Mapping, NamedTuple

from minicpmv_edge.families import Family, families
from minicpmv_edge.families.specs import CheckpointSpec

from . import minicpmv4_6, resampler
from .tokenizer import TokenizerFiles, backend_files, published_files
from .weights import Entry, plan_from_dims

Size = Literal["tiny", "full"]
VOCAB_PAD = 64   # published vocab sizes are padded too; tiny ones round len(tokenizer) up to this


class Builder(NamedTuple):
    # (folder, spec, dims, tokenizer, size, seed): writes the whole checkpoint into the empty `folder`
    write_into: Callable[[Path, CheckpointSpec, dict[str, Any], TokenizerFiles, str, int], None]
    tokenizer: Callable[[CheckpointSpec], TokenizerFiles]
    # (spec, dims) -> (name, shape) of every tensor, where the tensors are planned rather than made by a model
    plan: Callable[[CheckpointSpec, dict[str, Any]], list[Entry]] | None = None


BUILDERS: dict[str, Builder] = {
    "resampler": Builder(resampler.write_into, published_files, plan_from_dims),
    "minicpmv4_6": Builder(minicpmv4_6.write_into, backend_files),   # transformers' own class (test extra)
}


def _specs() -> dict[str, tuple[Family, CheckpointSpec]]:
    out: dict[str, tuple[Family, CheckpointSpec]] = {}
    for family in families():
        spec = family.synthetic
        if spec is None:
            continue
        out[family.key] = (family, spec)
        for key, fields in spec.variants.items():
            out[key] = (family, dataclasses.replace(spec, variants={}, **fields))
    return out


def synthetic_keys() -> tuple[str, ...]:
    """Every checkpoint `make_checkpoint` writes: the registry's families with a synthetic spec, in registry
    order, each followed by its variants."""
    return tuple(_specs())


def checkpoint_spec(key: str) -> tuple[Family, CheckpointSpec]:
    """The registry family of a synthetic key and its spec (a variant's fields already applied)."""
    specs = _specs()
    try:
        return specs[key]
    except KeyError:
        raise ValueError(f"unknown synthetic MiniCPM-V checkpoint {key!r}; known: {', '.join(specs)}") from None


def _builder(spec: CheckpointSpec) -> Builder:
    try:
        return BUILDERS[spec.builder]
    except KeyError:
        raise ValueError(f"no synthetic builder {spec.builder!r}; known: {', '.join(BUILDERS)}") from None


@functools.lru_cache(maxsize=None)
def build_tokenizer(key: str) -> TokenizerFiles:
    """Train (deterministically) and serialise the tokenizer of a synthetic key; cached per process."""
    spec = checkpoint_spec(key)[1]
    return _builder(spec).tokenizer(spec)


def longrope_factors(published: tuple[float, ...], head_dim: int) -> list[float]:
    """Published longrope factors resampled to head_dim/2 entries (llama.cpp wants n_rot/2)."""
    n = head_dim // 2
    return [published[round(i * (len(published) - 1) / max(n - 1, 1))] for i in range(n)]


def dims(key: str, size: Size = "tiny", overrides: Mapping[str, int] | None = None) -> dict[str, Any]:
    """Concrete numbers behind every ``$name`` placeholder of the spec's templates. `overrides` replaces
    some of them (e.g. ``{"hidden": 4096, "layers": 1}``: a tiny model with a published embedding width)."""
    spec = checkpoint_spec(key)[1]
    tok_size = build_tokenizer(key).size
    if size == "tiny":
        d: dict[str, Any] = {**spec.full, **spec.tiny, "vocab": -(-tok_size // VOCAB_PAD) * VOCAB_PAD}
        if "head_dim" not in spec.full:
            d.pop("head_dim", None)   # families whose config has no head_dim key derive it from hidden/heads
    elif size == "full":
        d = dict(spec.full)
        if d["vocab"] < tok_size:
            raise ValueError(f"{key}: tokenizer ({tok_size}) exceeds the published vocab_size {d['vocab']}")
    else:
        raise ValueError(f"size must be 'tiny' or 'full', not {size!r}")
    unknown = sorted(set(overrides or {}) - set(d) - {"head_dim"})
    if unknown:
        raise ValueError(f"{key}: no such dimension to override: {', '.join(unknown)}")
    d.update(overrides or {})
    if spec.longrope:
        d["longrope"] = longrope_factors(spec.longrope, d.get("head_dim") or d["hidden"] // d["heads"])
    return d


def plan_tensors(key: str, size: Size = "tiny") -> list[Entry]:
    """Every (name, shape) the checkpoint holds, in write order; no data is generated. Builders whose
    checkpoints a model class makes (MiniCPM-V 4.6) have no plan."""
    spec = checkpoint_spec(key)[1]
    plan = _builder(spec).plan
    if plan is None:
        raise ValueError(f"{key}: its checkpoints are made by {spec.builder!r}, which plans no tensors")
    return plan(spec, dims(key, size))


def make_checkpoint(family: str, out_dir: str | os.PathLike[str], size: Size = "tiny", seed: int = 0,
                    overrides: Mapping[str, int] | None = None) -> Path:
    """Write a random-weight checkpoint of `family` (one of `synthetic_keys()`) in its published Hugging Face
    layout. MiniCPM-V 4.6 is built by transformers itself (needs the `test` extra).

    The folder is assembled beside `out_dir` and renamed into place, so readers never see a
    half-written checkpoint; an existing `out_dir` is replaced. `overrides` replaces some of the size's
    dimensions: see `dims`.
    """
    spec = checkpoint_spec(family)[1]
    builder = _builder(spec)
    if size not in ("tiny", "full"):
        raise ValueError(f"size must be 'tiny' or 'full', not {size!r}")
    d = dims(family, size, overrides)
    tok = build_tokenizer(family)
    out = Path(out_dir).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        builder.write_into(tmp, spec, d, tok, size, seed)
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
