"""What the pinned llama.cpp (llama-cpp-python 0.3.36) loads.

- The converter refuses, in one line naming the config key and before writing anything, checkpoints whose
  GGUF llama.cpp would refuse or abort on (`LlmArch.check_config` / `check_tensors` in convert/llm_archs.py,
  `check` / `expected_tensors` in convert/qwen35.py).
- Every LLM GGUF the other tests convert loads in llama.cpp and decodes (test_convert.py already loads the
  resampler families at q4_k_m and MiniCPM-V 4.5 at every preset; the rest is loaded here).
- A failed load of the language model or the vision tower raises the runtime's error and prints nothing else.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import llama_cpp
import numpy as np
import pytest
from test_convert import assert_clean_failure, broken_copy, edit_config, run_cli

from minicpmv_edge.families import families, get
from minicpmv_edge.runtime.engine import Engine
from minicpmv_edge.synthetic import make_checkpoint

FAMILY46 = "minicpm-v-4.6"
ROPE46 = {"rope_theta": 10000000, "rope_type": "default"}  # the synthetic 4.6 text_config's rope_parameters


@pytest.mark.parametrize("source, damage, needle", [
    # Qwen3.5 (qwen35): linear attention sizes value heads by the key head size and repeats key heads.
    (FAMILY46, edit_config("text_config", linear_value_head_dim=32),
     "linear_value_head_dim 32 differs from linear_key_head_dim 16"),
    (FAMILY46, edit_config("text_config", linear_num_value_heads=3),
     "linear_num_value_heads 3 is not a multiple of linear_num_key_heads 2"),
    # Layer patterns: two kinds only; an interval that disagrees with the weights; none that divides by 0.
    (FAMILY46, edit_config("text_config", layer_types=["linear_attention"] * 3 + ["sliding_attention"]),
     "layer_types holds 'sliding_attention'"),
    (FAMILY46, edit_config("text_config", layer_types=None, full_attention_interval=0),
     "full_attention_interval must be a positive integer"),
    (FAMILY46, edit_config("text_config", layer_types=None, full_attention_interval=2),
     "(see config.json's full_attention_interval)"),
    (FAMILY46, edit_config("text_config", layer_types=["full_attention"] + ["linear_attention"] * 3),
     "(see config.json's layer_types)"),
    # Rope: an even number of rotated dimensions, at most four M-RoPE sections.
    (FAMILY46, edit_config("text_config", rope_parameters={**ROPE46, "partial_rotary_factor": 0.1}),
     "partial_rotary_factor 0.1 rotates 1 of 16"),
    (FAMILY46, edit_config("text_config", rope_parameters={**ROPE46, "partial_rotary_factor": 0.25,
                                                          "mrope_section": [1, 1, 0, 0, 1]}),
     "mrope_section [1, 1, 0, 0, 1]"),
    (FAMILY46, edit_config("text_config", rope_parameters={**ROPE46, "partial_rotary_factor": 0.25,
                                                          "rope_type": "yarn"}),
     "rope_type 'yarn'"),
    (FAMILY46, edit_config("text_config", num_key_value_heads=3),
     "num_attention_heads 4 is not a multiple of num_key_value_heads 3"),
    # A config that disagrees with the weights: the loader's shape check, named by the keys.
    (FAMILY46, edit_config("text_config", linear_conv_kernel_dim=3),
     "expects [128, 3] from config.json's linear_conv_kernel_dim"),
    ("minicpm-v-4.5", edit_config(num_hidden_layers=600), "num_hidden_layers is 600; llama.cpp loads at most 512"),
    ("minicpm-v-4.5", edit_config(partial_rotary_factor=0.5), "partial_rotary_factor is 0.5"),
    ("minicpm-v-4.5", edit_config(rope_scaling={"rope_type": "yarn", "factor": 2.0}), "rope_scaling type 'yarn'"),
    ("minicpm-v-4.5", edit_config(head_dim=32), "from config.json's num_attention_heads, head_dim, hidden_size"),
    ("minicpm-v-2.6", edit_config(head_dim=32), "head_dim 32 x num_attention_heads 4 is not hidden_size 256"),
    ("minicpm-llama3-v-2.5", edit_config(num_key_value_heads=3), "num_key_value_heads 3"),
    ("minicpm-v-4.0", edit_config(intermediate_size=256), "from config.json's intermediate_size"),
])
def test_what_llama_cpp_cannot_load_fails_in_one_line(source: str, damage, needle: str, tmp_path: Path,
                                                      tiny_checkpoint) -> None:  # noqa: ANN001
    folder = broken_copy(tmp_path, tiny_checkpoint(source))
    damage(folder)
    outdir = tmp_path / "out"
    assert_clean_failure(run_cli("convert", str(folder), "-o", str(outdir), "-q"), outdir, needle)


def test_unequal_linear_head_sizes_are_refused_before_writing(tmp_path: Path, monkeypatch) -> None:  # noqa: ANN001
    """Issue 9.6: weights consistent with a config whose value heads are wider than its key heads converted
    without complaint and llama.cpp refused the file (attn_qkv 'has wrong shape; expected 64, 128, got 64, 144')."""
    monkeypatch.setitem(get(FAMILY46).synthetic.tiny, "lin_v_dim", 20)
    folder = make_checkpoint(FAMILY46, tmp_path / "ckpt", size="tiny", seed=0)
    outdir = tmp_path / "out"
    assert_clean_failure(run_cli("convert", str(folder), "-o", str(outdir), "-q"), outdir,
                         "linear_value_head_dim 20 differs from linear_key_head_dim 16")


# Families x presets the other tests convert (test_model_parity, test_quant_parity, test_runtime_layout,
# test_ocr), less what test_convert.py already loads.
CONVERTED_PRESETS = ("f32", "f16", "q8_0", "q4_k_m")
RESAMPLER = [f.key for f in families() if f.projector == "resampler"]
NOT_YET_LOADED = [(f.key, preset) for f in families() for preset in CONVERTED_PRESETS
                  if f.key != "minicpm-v-4.5" and not (f.key in RESAMPLER and preset == "q4_k_m")]


@pytest.mark.parametrize("which, preset", NOT_YET_LOADED)
def test_every_converted_llm_loads(which: str, preset: str, converted) -> None:  # noqa: ANN001
    """Loaded as the runtime loads it (Engine: no weight repacking). llama-cpp-python's `Llama` keeps its default
    use_extra_bufts, which on this AMX host routes quantized matmuls to ggml's AMX kernel, and that segfaults."""
    engine = Engine(converted(which, preset).llm_path, n_ctx=64, n_threads=2)
    try:
        tokens = engine.tokenize("Hello world")
        assert engine.feed(tokens, {}) == len(tokens)
        n_vocab = llama_cpp.llama_vocab_n_tokens(engine.vocab)
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(engine.ctx, -1), shape=(n_vocab,))
        assert np.isfinite(logits).all() and logits.any()
    finally:
        engine.close()


FAILED_LOADS = textwrap.dedent("""
    import gc, sys
    from pathlib import Path
    from minicpmv_edge.runtime.engine import Engine, EngineError
    from minicpmv_edge.runtime.vision import VisionError, VisionTower

    good_llm, *broken = map(Path, sys.argv[1:])
    for path in broken:
        try:
            Engine(path, n_ctx=64, n_threads=1)
        except EngineError as e:
            print(e)
    engine = Engine(good_llm, n_ctx=64, n_threads=1)
    for path in broken:
        try:
            VisionTower(path, engine.model, n_threads=1)
        except VisionError as e:
            print(e)
    engine.close()
    gc.collect()
""")


def test_failed_loads_raise_the_runtime_error_and_print_nothing(tmp_path: Path, converted) -> None:  # noqa: ANN001
    result = converted("minicpm-v-4.5", "q8_0")
    junk = tmp_path / "x.gguf"
    junk.write_bytes(np.random.default_rng(0).bytes(4096))
    truncated = tmp_path / "truncated.gguf"  # a valid header whose tensor data runs past the end of the file
    data = result.mmproj_path.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    proc = subprocess.run([sys.executable, "-c", FAILED_LOADS, str(result.llm_path), str(junk), str(truncated)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    assert proc.stdout.splitlines() == [
        f"cannot load the language model from {junk}", f"cannot load the language model from {truncated}",
        f"cannot load the vision tower from {junk}", f"cannot load the vision tower from {truncated}"]
