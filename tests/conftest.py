"""Shared fixtures: tiny synthetic checkpoints and their conversions, built once per test session."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import pytest

from minicpmv_edge.convert import ConversionResult, convert_checkpoint
from minicpmv_edge.families import families
from minicpmv_edge.synthetic import make_checkpoint

# The registry's families, as synthetic checkpoint keys: the resampler ones (their torch references live in
# reference.py) and all of them. 4.6-Thinking, a synthetic variant of the 4.6 family, has 4.6's weights,
# tokenizer and converter path (only its chat template differs), so it is not among them.
RESAMPLER_FAMILIES = [f.key for f in families() if f.projector == "resampler"]
ALL_FAMILIES = [f.key for f in families()]


@pytest.fixture(scope="session", autouse=True)
def no_weight_repacking() -> None:
    """Tests that decode through llama-cpp-python's `Llama` get ggml's weight repacking off, as the runtime's
    Engine has it: `Llama` leaves it on, and on CPUs with AMX (amx_int8) the pinned build's AMX matmul
    segfaults decoding quantized weights (seen in gdb: ggml_backend_amx_mul_mat)."""
    import llama_cpp.llama_cpp as bindings  # what llama_cpp.Llama calls

    default_params = bindings.llama_model_default_params

    def without_repacking():  # noqa: ANN202 - llama_model_params
        params = default_params()
        params.use_extra_bufts = False
        return params

    bindings.llama_model_default_params = without_repacking


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
def llamacpp_pair(workdir: Path, tiny_checkpoint: Callable[[str], Path]) -> Callable[[str], object]:
    """The GGUF pair (`.model`, `.mmproj`, `.steps`) that llama.cpp's own converters, from the pinned
    llama-cpp-python sdist, make of a family's tiny checkpoint: tests/llamacpp_made.py. Built once per family;
    skips when the sdist cannot be found or fetched."""
    from llamacpp_made import LlamaCppUnavailable, build_pair, llama_cpp_source

    made: dict[str, object] = {}
    source: dict[str, object] = {}

    def get(family: str) -> object:
        if "dir" not in source:
            try:
                source["dir"] = llama_cpp_source()
            except LlamaCppUnavailable as exc:
                source["dir"] = exc
        if isinstance(source["dir"], LlamaCppUnavailable):
            pytest.skip(f"llama.cpp converters unavailable: {source['dir']}")
        if family not in made:
            try:
                made[family] = build_pair(family, tiny_checkpoint(family), workdir / "llamacpp" / family,
                                          source["dir"])
            except Exception as exc:  # noqa: BLE001 - remembered so later tests do not rebuild a failing pair
                made[family] = exc
        if isinstance(made[family], Exception):
            raise made[family]
        return made[family]

    return get


@pytest.fixture(scope="module")
def checkpoint(request: pytest.FixtureRequest, tiny_checkpoint: Callable[[str], Path]) -> Path:
    """The tiny checkpoint of the requesting test module's `FAMILY`."""
    return tiny_checkpoint(request.module.FAMILY)


@pytest.fixture(scope="module")
def runtime(checkpoint: Path, workdir: Path):  # noqa: ANN201
    """`runtime(mode, preset)`: our conversion of the module's checkpoint in that downsample mode (None: the
    checkpoint's own) and preset, loaded once per module (`.conversion` holds the ConversionResult)."""
    from minicpmv_edge.runtime import load

    loaded = {}

    def get(mode: str | None, preset: str):  # noqa: ANN202
        if (mode, preset) not in loaded:
            result = convert_checkpoint(checkpoint, workdir / "runtime" / checkpoint.name / f"{preset}-{mode}",
                                        preset, downsample_mode=mode)
            loaded[mode, preset] = load(result.llm_path, result.mmproj_path)
            loaded[mode, preset].conversion = result
        return loaded[mode, preset]

    yield get
    for model in loaded.values():
        model.close()


@pytest.fixture(scope="module")
def reference(checkpoint: Path):  # noqa: ANN201 - a transformers PreTrainedModel
    """transformers' own model of `checkpoint`, for the families transformers ships (4.6, MiniCPM-OCR)."""
    from official import transformers_reference

    return transformers_reference(checkpoint)


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
        metafunc.parametrize("family", RESAMPLER_FAMILIES)
    if "any_family" in metafunc.fixturenames:
        metafunc.parametrize("any_family", ALL_FAMILIES)
