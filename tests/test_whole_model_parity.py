"""The whole runtime (official layout, clip.cpp pieces, embeddings into llama.cpp) against a torch reference
of the whole model on the same weights: transformers' LLM class fed the official processor's token ids
with the `<unk>` runs replaced by reference image embeddings (transformers' Idefics2VisionTransformer + our
resampler from the published architecture), per piece.

F32 language model and F32 mmproj; stated tolerance: argmax equal at every prompt position, greedy
generation equal for 32 steps (or up to an end-of-generation token both produce). ViT positions follow the
2-D patch grid of each piece, as clip.cpp computes them; that is the published scheme for every family but
2.5, whose flat-strip positions clip.cpp cannot express (measured and bounded in test_model_parity)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from official import official_prompt_ids, random_image, reference_pieces
from reference import encode_image_reference, language_model

from minicpmv_edge.runtime import load

STEPS = 32
CHATS = {
    "single image": lambda a, b: [{"role": "user", "content": [a, "What is in the image?"]}],
    "sliced image": lambda a, b: [{"role": "user", "content": [b, "Read the document."]}],
    "two images": lambda a, b: [{"role": "user", "content": [a, b, "Compare them."]}],
    "two turns": lambda a, b: [{"role": "user", "content": [a, "Describe it."]},
                               {"role": "assistant", "content": "A picture."},
                               {"role": "user", "content": [b, "And this one?"]}],
    "few-shot": lambda a, b: [{"role": "user", "content": [a, "Label?"]}, {"role": "assistant", "content": "cat"},
                              {"role": "user", "content": [b, "Label?"]}],
}


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
    msgs = CHATS[chat](random_image((500, 300), 1), random_image((1000, 760), 2))
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
        generated, sequence = [], embeds
        for _ in range(STEPS):
            token = int(llm(inputs_embeds=sequence[None]).logits[0, -1].argmax())
            generated.append(token)
            sequence = torch.cat([sequence, llm.get_input_embeddings()(torch.tensor([token]))])

    # ours: the runtime's own prompt, all logits, then its own greedy loop
    model = runtimes(family)
    items, _ = model.prepare(msgs)
    assert [item if isinstance(item, int) else unk_id for item in items] == ids
    model.engine.history = []
    ours_logits = np.zeros((len(items), reference_logits.shape[1]), dtype=np.float32)

    def keep(start: int, rows: np.ndarray) -> None:
        ours_logits[start:start + len(rows)] = rows[:, : reference_logits.shape[1]]

    model.engine.feed(items, model._embeddings, on_logits=keep)
    assert (ours_logits.argmax(-1) == reference_logits.argmax(-1)).all()

    ours_tokens = [record.token for record in model.stream_generate(msgs, max_new_tokens=STEPS)]
    assert ours_tokens == generated[: len(ours_tokens)]
    assert len(ours_tokens) == STEPS or model.engine.is_end(ours_tokens[-1])
