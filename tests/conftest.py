"""Shared fixtures: tiny synthetic checkpoints and their conversions, built once per test session."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import pytest

from minicpmv_edge.convert import ConversionResult, convert_checkpoint
from minicpmv_edge.convert.synthetic import FAMILIES, MERGER_FAMILIES, make_checkpoint

# 4.6-Thinking has 4.6's weights, tokenizer and converter path; only its chat template differs.
ALL_FAMILIES = FAMILIES + MERGER_FAMILIES[:1]


@pytest.fixture(scope="session")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("minicpmv")


@pytest.fixture(scope="session")
def tiny_checkpoint(workdir: Path) -> Callable[[str], Path]:
    made: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in made:
            made[family] = make_checkpoint(family, workdir / "checkpoints" / family, size="tiny", seed=0)
        return made[family]

    return get


@pytest.fixture(scope="session")
def converted(workdir: Path, tiny_checkpoint: Callable[[str], Path]) -> Callable[[str, str], ConversionResult]:
    done: dict[tuple[str, str], ConversionResult] = {}

    def get(family: str, preset: str) -> ConversionResult:
        key = (family, preset)
        if key not in done:
            done[key] = convert_checkpoint(tiny_checkpoint(family), workdir / "gguf" / family / preset, preset)
        return done[key]

    return get


@pytest.fixture(scope="session")
def hf_tokenizer() -> Callable[[Path], object]:
    """transformers' tokenizer of a checkpoint folder. The published config.json names remote code and 4.0's
    longrope rope_scaling trips transformers' generic config, so neither is consulted."""
    from transformers import AutoTokenizer, PretrainedConfig

    return lambda folder: AutoTokenizer.from_pretrained(folder, trust_remote_code=False, config=PretrainedConfig())


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """`family`: the resampler families (their torch references live in reference.py); `any_family`: those
    and MiniCPM-V 4.6, for tests that hold for every converted model."""
    if "family" in metafunc.fixturenames:
        metafunc.parametrize("family", FAMILIES)
    if "any_family" in metafunc.fixturenames:
        metafunc.parametrize("any_family", ALL_FAMILIES)
