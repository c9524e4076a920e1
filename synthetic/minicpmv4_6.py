"""The writer of checkpoints in MiniCPM-V 4.6's layout (`CheckpointSpec.builder == "minicpmv4_6"`: 4.6, its
4.6-Thinking variant, MiniCPM-OCR 1.0): random weights made by transformers.

Unlike the resampler families (one generic writer over the spec's templates and tensor plan), these folders
are built with transformers' own class, the one the spec's `config["architectures"]` names
(`MiniCPMV4_6ForConditionalGeneration`, `MiniCPMOcrForConditionalGeneration`), + `save_pretrained`, so tensor
names, shapes and the config layout are exactly what the published checkpoints carry; the spec's `config` is
the keyword arguments of that class's config class. torch / transformers are imported lazily,
inside `write_into` only: the package is imported by a runtime that must not import torch.

What is published and what is assumed: families/PUBLISHED.md ("MiniCPM-V 4.6").
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from minicpmv_edge.families.specs import CheckpointSpec

from .files import render, write_json
from .tokenizer import TokenizerFiles


def layer_types(d: dict[str, Any]) -> list[str]:
    """Qwen3.5's layer pattern: every `full_attention_interval`-th layer full attention, the rest linear."""
    return ["linear_attention" if (i + 1) % d["full_attention_interval"] else "full_attention"
            for i in range(d["layers"])]


def config_kwargs(spec: CheckpointSpec, d: dict[str, Any], tok: TokenizerFiles) -> dict[str, Any]:
    """Keyword arguments of the model's config class in the published layout (top level, text, vision)."""
    return render(spec.config, {**d, "layer_types": layer_types(d)}, tok.vocab)


def _import_transformers(architecture: str) -> tuple[Any, Any, Any]:
    """torch, and transformers' model class named `architecture` with its config class."""
    try:
        import torch
        import transformers
        model_cls = getattr(transformers, architecture)
    except (ImportError, AttributeError) as exc:
        raise RuntimeError(
            f"these synthetic checkpoints are built with transformers' {architecture} (transformers 5.23 has it) "
            f"and torch ({exc}); install them with: pip install -e '.[test]'") from exc
    return torch, model_cls.config_class, model_cls


def write_into(folder: Path, spec: CheckpointSpec, d: dict[str, Any], tok: TokenizerFiles, size: str,
               seed: int) -> None:
    """Write the whole checkpoint into the (empty, temporary) `folder`."""
    kwargs = config_kwargs(spec, d, tok)
    torch, config_cls, model_cls = _import_transformers(kwargs["architectures"][0])

    config = config_cls(**kwargs)
    torch.manual_seed(seed)
    model = model_cls(config)
    model.to(torch.bfloat16)
    model.eval()
    model.save_pretrained(folder, max_shard_size="5GB")
    del model

    # generation_config.json: save_pretrained wrote one from the model config; replace it with the
    # published-style file (ids from the synthetic vocab), keeping the writer's transformers_version.
    gen_path = folder / "generation_config.json"
    version = json.loads(gen_path.read_text()).get("transformers_version") if gen_path.exists() else None
    gen = render(spec.generation_config, d, tok.vocab)
    if version:
        gen["transformers_version"] = version
    write_json(gen_path, gen)

    for name, content in tok.files.items():
        (folder / name).write_bytes(content)
    (folder / "chat_template.jinja").write_text(spec.chat_template, encoding="utf-8")
    write_json(folder / "preprocessor_config.json", spec.preprocessor_config)
    if spec.processor_config is not None:
        write_json(folder / "processor_config.json", spec.processor_config)
