"""The writer of the resampler-layout checkpoints (`CheckpointSpec.builder == "resampler"`: MiniCPM-Llama3-V
2.5, MiniCPM-V 2.6 / 4.0 / 4.5, MiniCPM-o 2.6 / 4.5): one generic code path over the family's spec. The
config files are the spec's templates rendered with the size's dims; the tensors follow `weights.plan_from_dims`
and are streamed into safetensors shards (two for tiny, save_pretrained's 5 GB cut for full)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from minicpmv_edge.families.specs import CheckpointSpec

from .files import render, write_json
from .tokenizer import TokenizerFiles
from .weights import assign_shards, plan_from_dims, write_safetensors


def write_into(folder: Path, spec: CheckpointSpec, d: dict[str, Any], tok: TokenizerFiles, size: str,
               seed: int) -> None:
    """Write the whole checkpoint into the (empty, temporary) `folder`."""
    write_json(folder / "config.json", render(spec.config, d, tok.vocab))
    write_json(folder / "generation_config.json", render(spec.generation_config, d, tok.vocab))
    write_json(folder / "preprocessor_config.json", spec.preprocessor_config)
    for name, content in tok.files.items():
        (folder / name).write_bytes(content)

    entries = plan_from_dims(spec, d)
    shards = assign_shards(entries, n_shards=2 if size == "tiny" else None)
    weight_map: dict[str, str] = {}
    total = 0
    for i, shard in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        total += write_safetensors(folder / fname, shard, seed)
        weight_map.update((name, fname) for name, _ in shard)
    write_json(folder / "model.safetensors.index.json", {"metadata": {"total_size": total}, "weight_map": weight_map})
