"""Our one-pass Q4_K_M against llama.cpp's own `llama_model_quantize` on a GGUF our converter wrote.

Type assignment must be identical whether llama.cpp starts from our F16 or our F32 file. Bytes must be
identical against the F32 file: bf16 -> f32 is exact, so both quantizers see the same values. From the
F16 file llama.cpp sees values rounded through float16 (bf16 values below 2^-17 in magnitude lose bits),
so a few blocks legitimately differ there; we count them to show the difference stays that small."""

from __future__ import annotations

import ctypes
from pathlib import Path

import llama_cpp
from gguf import GGUFReader

LLAMA_FTYPE_MOSTLY_Q4_K_M = 15


def llama_quantize(source: Path, target: Path, ftype: int) -> dict:
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = 2
    assert llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(), ctypes.byref(params)) == 0
    return {t.name: t for t in GGUFReader(target).tensors}


def test_q4_k_m_matches_llama_quantize(any_family: str, converted, tmp_path: Path) -> None:
    family = any_family
    ours = {t.name: t for t in GGUFReader(converted(family, "q4_k_m").llm_path).tensors}
    from_f32 = llama_quantize(converted(family, "f32").llm_path, tmp_path / "from_f32.gguf",
                              LLAMA_FTYPE_MOSTLY_Q4_K_M)
    from_f16 = llama_quantize(converted(family, "f16").llm_path, tmp_path / "from_f16.gguf",
                              LLAMA_FTYPE_MOSTLY_Q4_K_M)

    assert set(ours) == set(from_f32) == set(from_f16)
    for name, tensor in ours.items():
        assert tensor.tensor_type == from_f32[name].tensor_type == from_f16[name].tensor_type, name
        assert tensor.data.tobytes() == from_f32[name].data.tobytes(), name
    # The tiny models still exercise the mixture: Q6_K for the "more bits" layers, Q4_K elsewhere (tiny 4.6's
    # 64-wide rows fall back from those to Q8_0 and Q5_0).
    types = {t.tensor_type.name for t in ours.values()}
    assert {"Q4_K", "Q6_K", "F32"} <= types or {"Q5_0", "Q8_0", "F32"} <= types
    differing = sum(t.data.tobytes() != from_f16[n].data.tobytes() for n, t in ours.items())
    assert differing <= len(ours) // 4


def test_row_fallbacks_and_layer_pattern_match_llama_quantize(tmp_path: Path, monkeypatch) -> None:
    """Rows that k-quant blocks cannot hold (hidden 384, ffn 320) fall back as llama.cpp does
    (Q4_K -> Q5_0, Q6_K -> Q8_0, output -> Q8_0), over 8 layers of the use-more-bits pattern."""
    from minicpmv_edge.convert import convert_checkpoint
    from minicpmv_edge.families import get
    from minicpmv_edge.synthetic import make_checkpoint

    for key, value in {"hidden": 384, "intermediate": 320, "layers": 8}.items():
        monkeypatch.setitem(get("minicpm-v-4.5").synthetic.tiny, key, value)
    checkpoint = make_checkpoint("minicpm-v-4.5", tmp_path / "odd")
    ours = {t.name: t for t in GGUFReader(convert_checkpoint(checkpoint, tmp_path / "q", "q4_k_m").llm_path).tensors}
    reference = llama_quantize(convert_checkpoint(checkpoint, tmp_path / "f", "f32").llm_path,
                               tmp_path / "ref.gguf", LLAMA_FTYPE_MOSTLY_Q4_K_M)
    assert {n: t.tensor_type for n, t in ours.items()} == {n: t.tensor_type for n, t in reference.items()}
    assert all(t.data.tobytes() == reference[n].data.tobytes() for n, t in ours.items())
    types = {t.tensor_type.name for t in ours.values()}
    assert {"Q5_0", "Q8_0"} <= types
