"""Prompt fidelity: the runtime lays out chats and images exactly as the official MiniCPM-V processor does
(the reference is `official.py`), and clip.cpp's encoder called through the runtime's own path gives mtmd's
embeddings bit for bit. The layout holds for pairs made by llama.cpp's own converters too, which carry none
of our converter's keys."""

from __future__ import annotations

import numpy as np
import pytest
from official import CHATS, official_prompt_ids, random_image, reference_geometry

from minicpmv_edge.runtime import load
from minicpmv_edge.runtime.slicing import cut, plan_slices

SIZES = [(448, 448), (600, 300), (1000, 150), (300, 200), (1344, 1344), (900, 1600), (2000, 500)]


@pytest.mark.parametrize("max_slice_nums", [9, 16, 36])
@pytest.mark.parametrize("size", SIZES + [(5000, 300), (3000, 3000)])
def test_slicing_matches_reference_geometry(size: tuple[int, int], max_slice_nums: int) -> None:
    layout = plan_slices(size, max_slice_nums)
    overview, grid, slice_size = reference_geometry(size, max_slice_nums)
    assert layout.overview == overview
    assert layout.grid == grid
    assert layout.slice_size == slice_size
    pieces = cut(random_image(size), layout)
    assert pieces[0].size == overview
    assert len(pieces) == 1 + (grid[0] * grid[1] if grid else 0)
    assert all(piece.size == slice_size for piece in pieces[1:])


@pytest.fixture(scope="module")
def models(converted, llamacpp_pair):  # noqa: ANN001, ANN201
    """A family's pair as our converter makes it, or (`source="llama.cpp"`) as llama.cpp's own converters do."""
    loaded = {}

    def get(family: str, source: str = "ours"):  # noqa: ANN202
        if (family, source) not in loaded:
            if source == "ours":
                loaded[family, source] = load(converted(family, "q8_0").llm_path.parent)
            else:
                pair = llamacpp_pair(family)
                loaded[family, source] = load(pair.model, pair.mmproj)
        return loaded[family, source]

    yield get
    for model in loaded.values():
        model.close()


@pytest.mark.parametrize("source", ["ours", "llama.cpp"])
@pytest.mark.parametrize("max_slice_nums", [9, 16])
@pytest.mark.parametrize("chat", list(CHATS))
def test_prompt_tokens_match_official_processor(family: str, chat: str, max_slice_nums: int, source: str, models,
                                                tiny_checkpoint, hf_tokenizer) -> None:
    folder = tiny_checkpoint(family)
    sizes = [(1000, 150), (1344, 1344)] if chat == "two images" else [(300, 200), (900, 1600)]
    images = [random_image(size, seed) for seed, size in enumerate(sizes)]
    msgs = CHATS[chat](*images)

    items, _ = models(family, source).prepare(msgs, max_slice_nums=max_slice_nums)
    expected, unk_id, _ = official_prompt_ids(folder, family, msgs, hf_tokenizer, max_slice_nums)
    assert [item if isinstance(item, int) else unk_id for item in items] == expected


def test_piece_encoder_equals_mtmd(family: str, models) -> None:
    model = models(family)
    image = random_image((448, 448), 3)
    [reference] = model.vision.tower.encode_image(image)
    np.testing.assert_array_equal(model.vision.encoder.encode(image), reference)
