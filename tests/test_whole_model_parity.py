"""The whole runtime (official layout, clip.cpp pieces, embeddings into llama.cpp) against a torch reference
of the whole model on the same weights: transformers' LLM class fed the official processor's token ids
with the `<unk>` runs replaced by reference image embeddings (transformers' Idefics2VisionTransformer + our
resampler from the published architecture), per piece.

F32 language model and F32 mmproj; stated tolerance: logits within 0.05 at every prompt position (the KV
cache is F16), and at every prompt position and each of 32 greedy steps our token is the reference's argmax
on the same prefix or within 2e-3 of its max logit (random tiny weights give flat logits with near-ties). ViT positions follow the
2-D patch grid of each piece, as clip.cpp computes them; that is the published scheme for every family but
2.5, whose flat-strip positions clip.cpp cannot express (measured and bounded in test_model_parity).
clip.cpp buckets positions as floor(70 i / n) where the published code bucketizes float32 fractions; the two
disagree for a few grid sides (25, 49, 50, 55, 58, 77, 82, 86, 94, 98 patches), measured below."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from official import CHATS, official_prompt_ids, random_image, reference_pieces
from reference import encode_image_reference, language_model

from minicpmv_edge.runtime import load

STEPS = 32
LOGIT_TOLERANCE = 0.05  # llama.cpp keeps the KV cache in F16; over ~600 positions logits drift ~1e-2
TIE = 2e-3  # a top-2 gap this small is float noise: either token is the argmax


def preprocess(piece, preprocessor: dict) -> torch.Tensor:  # noqa: ANN001
    pixels = np.asarray(piece.convert("RGB"), dtype=np.float32) / 255.0
    mean = np.asarray(preprocessor.get("norm_mean", [0.5] * 3), dtype=np.float32)
    std = np.asarray(preprocessor.get("norm_std", [0.5] * 3), dtype=np.float32)
    return torch.from_numpy(((pixels - mean) / std).transpose(2, 0, 1).copy())


@pytest.fixture(scope="module")
def runtimes(converted):  # noqa: ANN001, ANN201
    loaded = {}
    yield lambda family: loaded.setdefault(family, load(converted(family, "f32").llm_path.parent, n_ctx=2048))
    for model in loaded.values():
        model.close()


@pytest.mark.parametrize("chat", list(CHATS))
def test_runtime_matches_torch_reference(family: str, chat: str, runtimes, tiny_checkpoint, hf_tokenizer) -> None:
    folder = tiny_checkpoint(family)
    preprocessor = json.loads((folder / "preprocessor_config.json").read_text())
    # A 420x300 image kept whole (upscaled to 38x27 patches) and a 1000x760 one cut into an overview and 2x2
    # slices (37x28 patches each): grid sides where clip.cpp's position buckets equal the published ones.
    msgs = CHATS[chat](random_image((420, 300), 1), random_image((1000, 760), 2))
    max_slice_nums = int(preprocessor.get("max_slice_nums", 9))

    # reference: official ids, <unk> runs replaced piece by piece with reference embeddings
    ids, unk_id, images = official_prompt_ids(folder, family, msgs, hf_tokenizer, max_slice_nums)
    llm = language_model(folder)
    with torch.no_grad():
        pieces = [encode_image_reference(folder, preprocess(piece, preprocessor), position_grid="tgt")
                  for image in images for piece in reference_pieces(image, max_slice_nums)]
        embeds = llm.get_input_embeddings()(torch.tensor([ids]))[0].clone()
        slots = [i for i, token in enumerate(ids) if token == unk_id]
        embeds[slots] = torch.cat(pieces).to(embeds.dtype)
        reference_logits = llm(inputs_embeds=embeds[None]).logits[0].float().numpy()

    # ours: the runtime's own prompt, all logits, then its own greedy loop
    model = runtimes(family)
    items, _ = model.prepare(msgs)
    assert [item if isinstance(item, int) else unk_id for item in items] == ids
    ours_logits = model.prompt_logits(items)[:, : reference_logits.shape[1]]
    assert np.abs(ours_logits - reference_logits).max() < LOGIT_TOLERANCE
    chosen = reference_logits[np.arange(len(items)), ours_logits.argmax(-1)]
    assert (chosen >= reference_logits.max(-1) - TIE).all()

    ours_tokens = [record.token for record in model.stream_generate(msgs, max_new_tokens=STEPS)]
    # Teacher-forced on our tokens, the reference must rank each one first, up to a near-tie: random tiny
    # weights give flat logits where top-2 gaps below float32 noise (TIE logits) occur.
    with torch.no_grad():
        sequence = embeds
        for token in ours_tokens:
            logits = llm(inputs_embeds=sequence[None]).logits[0, -1]
            assert float(logits[token]) >= float(logits.max()) - TIE
            sequence = torch.cat([sequence, llm.get_input_embeddings()(torch.tensor([token]))])
    # ... so the reference ended where ours did (its choice there is that end token) or ran all STEPS too
    assert_stopped_with_reference(ours_tokens, model.engine.is_end, end_ids(folder), STEPS)


def end_ids(folder) -> set[int]:  # noqa: ANN001
    """The published generate()'s stop tokens: generation_config.json's eos_token_id (an id or a list)."""
    eos = json.loads((folder / "generation_config.json").read_text())["eos_token_id"]
    return set(eos if isinstance(eos, list) else [eos])


def assert_stopped_with_reference(tokens: list[int], is_end, stops: set[int], steps: int) -> None:  # noqa: ANN001
    """For a greedy run each of whose tokens the reference chose on the same prefix: it stopped where the
    reference stops. Ours ends at every stop token of the reference (`stops`; ours may end at more: llama.cpp's
    end-of-generation set also holds e.g. <|eot_id|>, <|endoftext|>), no token before the last is an end token
    of either, and the run is `steps` tokens long or its last token, which the reference chose there, is an end
    token."""
    assert tokens, "no token generated"
    assert all(is_end(t) for t in stops), f"the runtime does not end at all of {sorted(stops)}"
    assert not [t for t in tokens[:-1] if t in stops or is_end(t)], f"went on after an end token: {tokens}"
    assert len(tokens) == steps or is_end(tokens[-1]), f"stopped after {len(tokens)} tokens at no end: {tokens}"


def test_position_bucket_rounding_is_the_only_vision_difference(converted, tiny_checkpoint) -> None:
    """A 574x350 piece (41x25 patches; 25 is a side where clip.cpp's floor(70 i / n) and the published float32
    bucketize disagree for some rows) differs measurably but boundedly from the published embedding."""
    folder = tiny_checkpoint("minicpm-v-4.5")
    preprocessor = json.loads((folder / "preprocessor_config.json").read_text())
    model = load(converted("minicpm-v-4.5", "f32").llm_path.parent, n_ctx=256)
    piece = random_image((574, 350), 4)
    ours = model.vision.encoder.encode(piece)
    model.close()
    pixels = preprocess(piece, preprocessor)
    with torch.no_grad():
        published = encode_image_reference(folder, pixels, position_grid="tgt").numpy()
    cosine = (ours * published).sum(-1) / np.linalg.norm(ours, axis=-1) / np.linalg.norm(published, axis=-1)
    assert 0.99 < cosine.min() < 0.99999
