"""int4 checkpoints (GPTQ with and without act-order, AWQ GEMM) as converter input.

The converter's dequantization must equal an independent reference written here from the published
formats (optimum/AutoGPTQ's and AutoAWQ's unpacking, element by element) bit for bit in float32. End to
end, the converted int4 model (F32 GGUF) must give the logits of transformers' class loaded with those
dequantized weights (argmax at every position), and stay close to its float source: 4-bit groups of 32 carry
a relative weight error of about 1/15 of the group's range, so logits keep a correlation >= 0.95 with the
float model's, not equality."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from llama_cpp import Llama

from minicpmv_edge.convert import convert_checkpoint
from minicpmv_edge.convert.checkpoint import open_checkpoint
from minicpmv_edge.convert.int4 import dequantize_awq, dequantize_gptq
from minicpmv_edge.synthetic import make_int4_checkpoint
from reference import language_model, load_state

VARIANTS = {"gptq": ("gptq", False), "gptq-act-order": ("gptq", True), "awq": ("awq", False)}
AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]


def reference_gptq(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor) -> torch.Tensor:
    n_in, n_out = qweight.shape[0] * 8, qweight.shape[1]
    weight = torch.empty(n_out, n_in, dtype=torch.float32)
    for i in range(n_in):
        q = (qweight[i // 8] >> (4 * (i % 8))) & 0xF
        g = int(g_idx[i])
        z = torch.stack([(qzeros[g, o // 8] >> (4 * (o % 8))) & 0xF for o in range(n_out)]) + 1
        weight[:, i] = scales[g].float() * (q - z).float()
    return weight


def reference_awq(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, group_size: int) -> torch.Tensor:
    n_in, n_out = qweight.shape[0], qweight.shape[1] * 8

    def column(words: torch.Tensor, o: int) -> torch.Tensor:
        return (words[..., o // 8] >> (4 * AWQ_ORDER.index(o % 8))) & 0xF

    weight = torch.empty(n_out, n_in, dtype=torch.float32)
    for o in range(n_out):
        q, z = column(qweight, o), column(qzeros, o)
        groups = torch.arange(n_in) // group_size
        weight[o] = (q - z[groups]).float() * scales[groups, o].float()
    return weight


@pytest.fixture(scope="module", params=list(VARIANTS))
def int4_checkpoint(request, tiny_checkpoint, tmp_path_factory) -> tuple[str, Path, Path]:  # noqa: ANN001
    method, act_order = VARIANTS[request.param]
    source = tiny_checkpoint("minicpm-v-4.5")
    folder = make_int4_checkpoint(source, tmp_path_factory.mktemp(request.param), method, 32, act_order)
    return method, source, folder


def test_dequantization_matches_reference_bit_for_bit(int4_checkpoint) -> None:
    method, _, folder = int4_checkpoint
    checkpoint = open_checkpoint(folder)
    base = "llm.model.layers.1.mlp.down_proj."
    parts = {p: checkpoint.read(base + p, as_stored=True) for p in ("qweight", "qzeros", "scales", "g_idx")
             if base + p in checkpoint.tensors}
    tensors = {p: torch.from_numpy(v) for p, v in parts.items()}
    if method == "gptq":
        ours = dequantize_gptq(parts["qweight"], parts["qzeros"], parts["scales"], parts["g_idx"])
        reference = reference_gptq(tensors["qweight"], tensors["qzeros"], tensors["scales"], tensors["g_idx"])
    else:
        ours = dequantize_awq(parts["qweight"], parts["qzeros"], parts["scales"], 32)
        reference = reference_awq(tensors["qweight"], tensors["qzeros"], tensors["scales"], 32)
    assert ours.dtype == np.float32 and np.array_equal(ours, reference.numpy())


def test_converted_int4_model_matches_its_dequantized_weights(int4_checkpoint, tmp_path: Path) -> None:
    _, source, folder = int4_checkpoint
    result = convert_checkpoint(folder, tmp_path / "gguf", "f32")
    ids = list(range(10, 74))
    model = Llama(str(result.llm_path), n_ctx=128, logits_all=True, verbose=False)
    model.eval(ids)
    ours = np.asarray(model.scores[: len(ids)], dtype=np.float32)

    float_model = language_model(source)
    dequantized = language_model(source)
    checkpoint = open_checkpoint(folder)
    state = load_state(source, "llm.")
    for name in state:
        if name.endswith("_proj.weight") and ".layers." in name:
            base = "llm." + name[: -len("weight")]
            parts = {p: checkpoint.read(base + p, as_stored=True) for p in ("qweight", "qzeros", "scales", "g_idx")
                     if base + p in checkpoint.tensors}
            state[name] = torch.from_numpy(dequantize_gptq(**parts) if "g_idx" in parts
                                           else dequantize_awq(**parts, group_size=32))
    dequantized.load_state_dict(state, strict=False)
    with torch.no_grad():
        expected = dequantized(input_ids=torch.tensor([ids])).logits[0].numpy()[:, : ours.shape[1]]
        original = float_model(input_ids=torch.tensor([ids])).logits[0].numpy()[:, : ours.shape[1]]
    assert (ours.argmax(-1) == expected.argmax(-1)).all() and np.abs(ours - expected).max() < 1e-3
    correlation = np.corrcoef(ours.ravel(), original.ravel())[0, 1]
    assert correlation >= 0.95
