"""The converter's MiniCPM-form path: a config.json with `scale_emb`, `scale_depth` and `dim_model_base` (the
MiniCPM LLM before its scales are folded into Llama-form weights) becomes llama.cpp's `minicpm` architecture,
and the projector is pre-divided by scale_emb because llama.cpp's minicpm graph multiplies every input
embedding (injected image rows included, src/llama-graph.cpp build_inp_embd) by it, where the published
get_vllm_embedding scales only the text embeddings.

The checkpoint is the tiny synthetic MiniCPM-V 4.0 with the three keys added; nothing else changes, since the
published MiniCPM LLM stores its weights unscaled and applies the scales in the forward pass
(modeling_minicpm.py: embed_tokens(ids) * scale_emb, residual branches x scale_depth / sqrt(num_layers),
lm_head(h / (hidden_size / dim_model_base))). Values as published for MiniCPM4-8B / 4.1-8B (scale_emb 12,
scale_depth 1.4), dim_model_base 32 instead of 256 so that hidden / dim_model_base is 8 on the tiny hidden 256
(16 at 4096 in the 8B). The reference is tests/reference.py's MiniCPMForCausalLM (transformers has no MiniCPM
class; test_reference.py checks ours against Llama with rescaled weights).

Stated tolerances (F32 GGUFs):
- text-only logits (64-token prompt): |llama.cpp - reference| < 2e-4 at every position (measured 3e-5; the
  logits themselves are ~0.2, divided by 8, so 1e-3 would let a 1% error in residual_scale through: measured
  9e-4), and llama.cpp's argmax is the reference's up to a near-tie of that size;
- the same with max_position_embeddings = 2 x original_max_position_embeddings and distinct long factors (the
  published LongRoPE then uses the long list and cos, sin x sqrt(1 + ln 2 / ln orig) at every length): 2e-4
  (measured 3e-5; 2.3e-3 before the converter wrote the chosen list as both and rope.scaling.attn_factor);
- image + text through the whole runtime (a whole image and one cut into an overview and 2x2 slices, 433
  prompt positions): logits within 2e-4 at every position (measured 2e-5; the KV cache is F16), argmax as
  above; then 32 greedy steps (or up to an end token), each token the reference's argmax on the same prefix
  up to TIE (test_whole_model_parity's 2e-3), stopping where the reference stops;
- stopping: no tiny greedy run reaches an end token within 32 steps, so one more checkpoint has <|im_end|>'s
  lm_head row x3, and its text-only greedy run must end with <|im_end|> where the reference chooses it.

The stop-at-end check is test_whole_model_parity's assert_stopped_with_reference.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGUFReader
from llama_cpp import Llama
from official import CHATS, official_prompt_ids, random_image, reference_pieces
from reference import encode_image_reference, language_model, llm_input_embeddings, load_state
from safetensors.torch import load_file, save_file
from test_convert import edit_config
from test_model_parity import prompt_ids
from test_whole_model_parity import TIE, assert_stopped_with_reference, end_ids, preprocess
from tokenizers import Tokenizer

from minicpmv_edge.convert import convert_checkpoint
from minicpmv_edge.runtime import load
from minicpmv_edge.synthetic import make_checkpoint

FAMILY = "minicpm-v-4.0"
SCALES = {"scale_emb": 12, "scale_depth": 1.4, "dim_model_base": 32}
TEXT_TOLERANCE = 2e-4
RUNTIME_TOLERANCE = 2e-4
STEPS = 32


@pytest.fixture(scope="module")
def checkpoint(workdir: Path) -> Path:
    folder = make_checkpoint(FAMILY, workdir / "minicpm-form" / "checkpoint", size="tiny", seed=0)
    edit_config(**SCALES)(folder)
    return folder


@pytest.fixture(scope="module")
def gguf_pair(checkpoint: Path, workdir: Path):  # noqa: ANN201
    return convert_checkpoint(checkpoint, workdir / "minicpm-form" / "f32", "f32")


def metadata(path: Path) -> dict[str, object]:
    reader = GGUFReader(path)
    return {name: field.contents() for name, field in reader.fields.items() if not name.startswith("tokenizer.")}


def gguf_tensor(path: Path, name: str) -> np.ndarray:
    [tensor] = [t for t in GGUFReader(path).tensors if t.name == name]
    return np.asarray(tensor.data)


def text_logits(gguf_path: Path, ids: list[int]) -> np.ndarray:
    model = Llama(str(gguf_path), n_ctx=128, n_batch=128, logits_all=True, n_threads=2, verbose=False)
    try:
        model.eval(ids)
        return np.asarray(model.scores[: len(ids)], dtype=np.float32)
    finally:
        model.close()


def test_minicpm_form_becomes_llama_cpp_minicpm(checkpoint: Path, gguf_pair, converted) -> None:  # noqa: ANN001
    config = json.loads((checkpoint / "config.json").read_text())
    meta = metadata(gguf_pair.llm_path)
    assert meta["general.architecture"] == "minicpm"
    assert meta["minicpm.embedding_scale"] == pytest.approx(12.0)
    assert meta["minicpm.residual_scale"] == pytest.approx(1.4 / math.sqrt(config["num_hidden_layers"]))
    assert meta["minicpm.logit_scale"] == pytest.approx(config["hidden_size"] / 32)
    orig = config["rope_scaling"]["original_max_position_embeddings"]  # LongRoPE's cos/sin factor (~1 here)
    assert meta["minicpm.rope.scaling.attn_factor"] == pytest.approx(
        math.sqrt(1 + math.log(config["max_position_embeddings"] / orig) / math.log(orig)))
    # the Llama-form family stays llama (and so has none of the scale keys)
    plain = metadata(converted(FAMILY, "f32").llm_path)
    assert plain["general.architecture"] == "llama"
    assert not [key for key in plain if key.endswith(("embedding_scale", "residual_scale", "logit_scale"))]
    # the projector: resampler.proj (applied as x @ proj) stored transposed, divided by scale_emb
    proj = load_state(checkpoint, "resampler.")["proj"].numpy()
    stored = gguf_tensor(gguf_pair.mmproj_path, "resampler.proj.weight")
    np.testing.assert_allclose(stored, proj.T / 12, rtol=1e-6, atol=0)


def test_text_logits_match_reference(checkpoint: Path, gguf_pair, hf_tokenizer) -> None:  # noqa: ANN001
    ids = prompt_ids(hf_tokenizer(checkpoint))
    ours = text_logits(gguf_pair.llm_path, ids)

    llm = language_model(checkpoint)
    assert type(llm).__name__ == "MiniCPMForCausalLM"
    with torch.no_grad():
        reference = llm(input_ids=torch.tensor([ids])).logits[0].float().numpy()[:, : ours.shape[1]]
    assert np.abs(ours - reference).max() < TEXT_TOLERANCE
    chosen = reference[np.arange(len(ids)), ours.argmax(-1)]
    assert (chosen >= reference.max(-1) - 2 * TEXT_TOLERANCE).all()


def test_long_context_longrope_matches_reference(checkpoint: Path, workdir: Path,  # noqa: ANN001
                                                 hf_tokenizer) -> None:  # noqa: ANN001
    """max_position_embeddings above original_max_position_embeddings: the published MiniCPMLongRoPE then uses
    the long factors at every length and multiplies cos and sin by sqrt(1 + ln(max / orig) / ln(orig)), where
    llama.cpp picks the list by context size (long only when n_ctx exceeds orig) and reads that factor from
    rope.scaling.attn_factor."""
    folder = workdir / "minicpm-form" / "long-context"
    shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(checkpoint, folder)
    config = json.loads((folder / "config.json").read_text())
    rope = config["rope_scaling"]
    rope["long_factor"] = [1.5 * f + 0.5 * i for i, f in enumerate(rope["short_factor"])]
    edit_config(max_position_embeddings=2 * rope["original_max_position_embeddings"], rope_scaling=rope)(folder)
    pair = convert_checkpoint(folder, workdir / "minicpm-form" / "long-context-f32", "f32")
    ids = prompt_ids(hf_tokenizer(folder))
    ours = text_logits(pair.llm_path, ids)
    llm = language_model(folder)
    orig = rope["original_max_position_embeddings"]
    assert llm.rotary.scale == pytest.approx(math.sqrt(1 + math.log(2) / math.log(orig)))
    with torch.no_grad():
        reference = llm(input_ids=torch.tensor([ids])).logits[0].float().numpy()[:, : ours.shape[1]]
    assert np.abs(ours - reference).max() < TEXT_TOLERANCE


def test_image_prompt_through_runtime_matches_reference(checkpoint: Path, gguf_pair,  # noqa: ANN001
                                                        hf_tokenizer) -> None:  # noqa: ANN001
    preprocessor = json.loads((checkpoint / "preprocessor_config.json").read_text())
    msgs = CHATS["two images"](random_image((420, 300), 1), random_image((1000, 760), 2))
    max_slice_nums = int(preprocessor.get("max_slice_nums", 9))

    # reference: the published get_vllm_embedding (text rows x scale_emb, image rows unscaled) into MiniCPM
    ids, unk_id, images = official_prompt_ids(checkpoint, FAMILY, msgs, hf_tokenizer, max_slice_nums)
    slots = np.flatnonzero(np.asarray(ids) == unk_id)
    runs = np.split(slots, np.flatnonzero(np.diff(slots) != 1) + 1)
    bounds = [(int(run[0]), int(run[-1]) + 1) for run in runs]
    llm = language_model(checkpoint)
    with torch.no_grad():
        pieces = [encode_image_reference(checkpoint, preprocess(piece, preprocessor), position_grid="tgt")
                  for image in images for piece in reference_pieces(image, max_slice_nums)]
        assert len(pieces) == len(bounds) == 2 + 4  # two overviews and 2x2 slices of the second image
        embeds = llm_input_embeddings(llm, ids, pieces, bounds)[0]
        reference_logits = llm(inputs_embeds=embeds[None]).logits[0].float().numpy()

    model = load(gguf_pair.llm_path.parent, n_ctx=2048)
    try:
        items, _ = model.prepare(msgs)
        assert [item if isinstance(item, int) else unk_id for item in items] == ids
        ours_logits = model.prompt_logits(items)[:, : reference_logits.shape[1]]
        ours_tokens = [record.token for record in model.stream_generate(msgs, max_new_tokens=STEPS)]
        ours_ends = {token for token in {*ours_tokens, *end_ids(checkpoint)} if model.engine.is_end(token)}
    finally:
        model.close()
    assert np.abs(ours_logits - reference_logits).max() < RUNTIME_TOLERANCE
    chosen = reference_logits[np.arange(len(items)), ours_logits.argmax(-1)]
    assert (chosen >= reference_logits.max(-1) - 2 * RUNTIME_TOLERANCE).all()

    # greedy: each token the reference's choice on the same prefix (up to a near-tie), the stop at the same step
    with torch.no_grad():
        sequence = embeds
        for step, token in enumerate(ours_tokens):
            logits = llm(inputs_embeds=sequence[None]).logits[0, -1]
            assert float(logits[token]) >= float(logits.max()) - TIE, step
            sequence = torch.cat([sequence, llm_input_embeddings(llm, [token])[0]])
    assert_stopped_with_reference(ours_tokens, ours_ends.__contains__, end_ids(checkpoint), STEPS)


@pytest.fixture(scope="module")
def stopping_pair(checkpoint: Path, workdir: Path):  # noqa: ANN201
    """The same checkpoint with <|im_end|>'s lm_head row x3: its greedy reply to STOP_PROMPT then ends with
    <|im_end|> at step 9 (top-2 gap 0.01 there) instead of running all STEPS, so the stop is exercised."""
    folder = workdir / "minicpm-form" / "stopping"
    shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(checkpoint, folder)
    end = Tokenizer.from_file(str(folder / "tokenizer.json")).token_to_id("<|im_end|>")
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shard = folder / index["weight_map"]["llm.lm_head.weight"]
    state = load_file(shard)
    state["llm.lm_head.weight"][end] *= 3
    save_file(state, shard, metadata={"format": "pt"})
    return folder, convert_checkpoint(folder, workdir / "minicpm-form" / "stopping-f32", "f32")


STOP_PROMPT = [{"role": "user", "content": "Describe a cat sitting on a windowsill in the sun."}]


def test_greedy_run_stops_where_the_reference_stops(stopping_pair) -> None:  # noqa: ANN001
    folder, pair = stopping_pair
    model = load(pair.llm_path.parent, n_ctx=512)
    try:
        items, _ = model.prepare(STOP_PROMPT)
        tokens = [record.token for record in model.stream_generate(STOP_PROMPT, max_new_tokens=STEPS)]
        ends = {token for token in {*tokens, *end_ids(folder)} if model.engine.is_end(token)}
    finally:
        model.close()
    assert all(isinstance(item, int) for item in items)
    llm = language_model(folder)
    with torch.no_grad():
        sequence = llm_input_embeddings(llm, items)[0]
        for step, token in enumerate(tokens):
            logits = llm(inputs_embeds=sequence[None]).logits[0, -1]
            assert float(logits[token]) >= float(logits.max()) - TIE, step
            sequence = torch.cat([sequence, llm_input_embeddings(llm, [token])[0]])
    assert_stopped_with_reference(tokens, ends.__contains__, end_ids(folder), STEPS)
    assert len(tokens) < STEPS  # the case this test is for: the reference's end token, before STEPS
