"""Prompt fidelity: the runtime lays out chats and images exactly as the official MiniCPM-V processor does.

References written independently here: slice geometry from transformers' MiniCPMV4_6ImageProcessorPil (the
published LLaVA-UHD algorithm in code; patch_size 3.5 with its 4-fold merge gives the resampler families'
14-pixel alignment), the placeholder text of the published processors (`<image_id>N</image_id>`,
`<image>` + query_num `<unk>` + `</image>`, slices row by row; 2.5 wraps its slices in `<slice>`), the chat
template rendered by transformers, and the published tokenizer.json. Also: clip.cpp's encoder called
through the runtime's own path gives mtmd's embeddings bit for bit."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from tokenizers import Tokenizer
from transformers.models.minicpmv4_6.image_processing_pil_minicpmv4_6 import MiniCPMV4_6ImageProcessorPil

from minicpmv_edge.runtime import load
from minicpmv_edge.runtime.slicing import cut, plan_slices

SIZES = [(448, 448), (600, 300), (1000, 150), (300, 200), (1344, 1344), (900, 1600), (2000, 500)]
REFERENCE = MiniCPMV4_6ImageProcessorPil()
HALF_PATCH = 3.5  # x4 merge = 14-pixel alignment


def reference_geometry(size: tuple[int, int], max_slice_nums: int) -> tuple[tuple, tuple | None, tuple | None]:
    """(overview (w, h), grid (cols, rows), slice (w, h)) from transformers' implementation."""
    width, height = size
    grid = REFERENCE.get_sliced_grid((height, width), max_slice_nums, 448)
    oh, ow = REFERENCE.find_best_resize((height, width), 448, HALF_PATCH, "16x", allow_upscale=grid is None)
    if grid is None:
        return (int(ow), int(oh)), None, None
    rh, rw = REFERENCE.get_refine_size((height, width), grid, 448, HALF_PATCH, "16x", allow_upscale=True)
    rows, cols = grid
    return (int(ow), int(oh)), (cols, rows), (int(rw) // cols, int(rh) // rows)


def random_image(size: tuple[int, int], seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


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


def official_placeholder(size: tuple[int, int], index: int, preprocessor: dict, family: str,
                         max_slice_nums: int) -> str:
    unk = preprocessor["unk"] * preprocessor["image_feature_size"]
    text = f"{preprocessor['im_start']}{unk}{preprocessor['im_end']}"
    if preprocessor.get("use_image_id"):
        text = f"{preprocessor['im_id_start']}{index}{preprocessor['im_id_end']}" + text
    _, grid, _ = reference_geometry(size, max_slice_nums)
    if grid is None:
        return text
    cols, rows = grid
    if family == "minicpm-llama3-v-2.5":
        piece = f"{preprocessor['im_start']}{unk}{preprocessor['im_end']}"
        return text + preprocessor["slice_start"] + "\n".join([piece * cols] * rows) + preprocessor["slice_end"]
    piece = f"{preprocessor['slice_start']}{unk}{preprocessor['slice_end']}"
    return text + "\n".join([piece * cols] * rows)


@pytest.fixture(scope="module")
def models(converted):  # noqa: ANN001, ANN201
    loaded = {}
    yield lambda family: loaded.setdefault(family, load(converted(family, "q8_0").llm_path.parent))
    for model in loaded.values():
        model.close()


CHATS = {
    "one image": lambda a, b: [{"role": "user", "content": [a, "What is in the image?"]}],
    "two images": lambda a, b: [{"role": "user", "content": [a, b, "Compare the two images."]}],
    "two turns": lambda a, b: [{"role": "user", "content": [a, "Describe it."]},
                               {"role": "assistant", "content": "A picture."},
                               {"role": "user", "content": [b, "And this one?"]}],
    "few-shot": lambda a, b: [{"role": "user", "content": [a, "Label?"]}, {"role": "assistant", "content": "cat"},
                              {"role": "user", "content": [b, "Label?"]}],
}


@pytest.mark.parametrize("max_slice_nums", [9, 16])
@pytest.mark.parametrize("chat", list(CHATS))
def test_prompt_tokens_match_official_processor(family: str, chat: str, max_slice_nums: int, models,
                                                tiny_checkpoint, hf_tokenizer) -> None:
    folder = tiny_checkpoint(family)
    preprocessor = json.loads((folder / "preprocessor_config.json").read_text())
    sizes = [(1000, 150), (1344, 1344)] if chat == "two images" else [(300, 200), (900, 1600)]
    images = [random_image(size, seed) for seed, size in enumerate(sizes)]
    msgs = CHATS[chat](*images)

    model = models(family)
    items, _ = model.prepare(msgs, max_slice_nums=max_slice_nums)
    unk_id = Tokenizer.from_file(str(folder / "tokenizer.json")).token_to_id(preprocessor["unk"])
    ours = [item if isinstance(item, int) else unk_id for item in items]

    marker = "(<image>./</image>)"
    hf_msgs = [{"role": m["role"], "content": "\n".join(marker if not isinstance(p, str) else p
                                                           for p in (m["content"] if isinstance(m["content"], list)
                                                                     else [m["content"]]))} for m in msgs]
    text = hf_tokenizer(folder).apply_chat_template(hf_msgs, tokenize=False, add_generation_prompt=True,
                                                    enable_thinking=False)
    for index, image in enumerate(images):
        text = text.replace(marker, official_placeholder(image.size, index, preprocessor, family, max_slice_nums), 1)
    expected = Tokenizer.from_file(str(folder / "tokenizer.json")).encode(text, add_special_tokens=False).ids
    assert ours == expected


def test_piece_encoder_equals_mtmd(family: str, models) -> None:
    model = models(family)
    image = random_image((448, 448), 3)
    [reference] = model.vision.encode_image(image)
    np.testing.assert_array_equal(model.pieces.encode(image), reference)
