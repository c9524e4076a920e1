"""MiniCPM-OCR 1.0 end to end against transformers' own implementation (`transformers.models.minicpm_ocr`) on the
same tiny synthetic weights: the converter (4x by default, tied and untied output), the published processor's
token layout in `small_image_upsize` "always", "never" and "adaptive" (OpenCV), and the model's numbers.

The published image processor (`MiniCPMOcrImageProcessor`) is torchvision-backed and torchvision is not
installed: `PublishedImageProcessor` is that class unchanged but for its two torchvision calls, the resize (done
with PIL's bicubic, as the runtime and 4.6's PIL processor resize) and the normalisation (the same arithmetic).

Stated tolerances:
- token layout: identical ids to the published `MiniCPMOcrProcessor` for five image shapes and four
  `max_slice_nums` values, in both upsize modes and both downsample modes; in "adaptive", for drawn pages that
  hit each of its branches (dense small text upsized, a tiny image, large text kept native, slices re-cut
  from the original at unequal sizes, resized or not) and the random images, both downsample modes;
- image features: per-token cosine >= 0.999 between clip.cpp (F16 mmproj) and the transformers model's vision
  path for every piece (measured: >= 0.99999), "adaptive" included (the unequally sliced pages, 4x);
- logits of an image + text prompt (F32 GGUF): the same argmax at every position and |difference| < 0.01;
  greedy generation: the same 32 tokens; a follow-up turn: what a fresh model and transformers generate.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGUFReader
from official import (CountingVision, assert_layout_matches, assert_piece_features_match, follow_up_turn,
                      image_ids, message_images, one_image_prompt, published_processor_class, random_image)
from PIL import Image, ImageDraw

from minicpmv_edge.convert import convert_checkpoint
from minicpmv_edge.families import get
from minicpmv_edge.runtime import load
from minicpmv_edge.runtime.prompt import ChatInputError

transformers = pytest.importorskip("transformers")
from transformers.models.minicpm_ocr.image_processing_minicpm_ocr import MiniCPMOcrImageProcessor  # noqa: E402
from transformers.models.minicpm_ocr.processing_minicpm_ocr import MiniCPMOcrProcessor  # noqa: E402
from transformers.models.minicpm_ocr.video_processing_minicpm_ocr import MiniCPMOcrVideoProcessor  # noqa: E402

FAMILY = "minicpm-ocr-1.0"
SIZES = {"small": (300, 200), "tiny": (60, 40), "wide": (1200, 400), "tall": (400, 1100), "large": (1500, 1300)}
QUESTION = "Read the text."


class PublishedImageProcessor(MiniCPMOcrImageProcessor):
    """MiniCPMOcrImageProcessor with PIL's bicubic resize and plain-torch normalisation instead of torchvision's."""

    def resize(self, image, size, resample=None, **kwargs):  # noqa: ANN001, ANN201
        pil = Image.fromarray(image.permute(1, 2, 0).numpy())
        out = pil.resize((size.width, size.height), Image.Resampling.BICUBIC)
        return torch.from_numpy(np.asarray(out).copy()).permute(2, 0, 1).contiguous()

    def normalize(self, image, mean, std, inplace=False, **kwargs):  # noqa: ANN001, ANN201
        mean = torch.as_tensor(mean, dtype=image.dtype).reshape(-1, 1, 1)
        std = torch.as_tensor(std, dtype=image.dtype).reshape(-1, 1, 1)
        return (image - mean) / std


class LayoutOnlyImageProcessor(MiniCPMOcrImageProcessor):
    """MiniCPMOcrImageProcessor whose resize makes a blank image of the size it chose: the token layout depends on
    the sizes only, and this keeps the layout test fast."""

    def resize(self, image, size, resample=None, **kwargs):  # noqa: ANN001, ANN201
        return torch.zeros((image.shape[0], size.height, size.width), dtype=image.dtype)

    def normalize(self, image, mean, std, inplace=False, **kwargs):  # noqa: ANN001, ANN201
        return image


PublishedProcessor = published_processor_class(MiniCPMOcrProcessor)


def images_processor(checkpoint: Path, mode: str, upsize: str) -> PublishedImageProcessor:
    return PublishedImageProcessor.from_pretrained(checkpoint, downsample_mode=mode, small_image_upsize=upsize)


def processor(checkpoint: Path, mode: str, upsize: str) -> PublishedProcessor:
    tokenizer = transformers.AutoTokenizer.from_pretrained(checkpoint)
    images = LayoutOnlyImageProcessor.from_pretrained(checkpoint, downsample_mode=mode, small_image_upsize=upsize)
    return PublishedProcessor(image_processor=images,
                              video_processor=MiniCPMOcrVideoProcessor(), tokenizer=tokenizer)


def page(size: tuple[int, int], *blocks: tuple[tuple[int, int, int, int], int, int]) -> Image.Image:
    """A white page with black glyph-like boxes: per block, a region (left, top, right, bottom) filled with
    boxes `height` x `width` px on a grid of pitch (1.8 x width, 1.6 x height)."""
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    for (left, top, right, bottom), height, width in blocks:
        for y in range(top, bottom - height, int(height * 1.6)):
            for x in range(left, right - width, int(width * 1.8)):
                draw.rectangle((x, y, x + width - 1, y + height - 1), fill="black")
    return image


# Each hits a branch of the published adaptive mode (checked on the runtime's layout in the layout test).
ADAPTIVE_PAGES = {
    "dense small text": page((300, 200), ((5, 5, 295, 195), 8, 5)),            # unsliced, upsized to ~448^2
    "tiny": page((60, 40), ((20, 8, 40, 38), 20, 12)),                        # < 6272 px: towards 84^2
    "large text": page((400, 300), ((10, 10, 390, 290), 30, 18)),             # unsliced, kept native
    "unequal": page((1000, 330), ((0, 0, 500, 330), 8, 5)),                   # 3x1, cells 333/334 px wide
    "aligned": page((1008, 336), ((0, 0, 336, 336), 8, 5), ((340, 0, 670, 336), 40, 24)),  # 336 px cells
    "big": page((1500, 1300), ((0, 0, 1500, 1300), 40, 24)),                  # 3x3, cells above 448^2
}


def test_family_is_detected_and_converted_with_its_defaults(checkpoint: Path, runtime) -> None:  # noqa: ANN001
    model = runtime(None, "f16")   # no --downsample-mode: the preprocessor config's 4x
    assert model.family == FAMILY and model.settings.from_file
    assert model.settings.small_image_upsize == "always" and model.max_slice_nums == 9
    assert model.vision.piece_align == 28
    result = model.conversion
    # 4x is the checkpoint's default: the plain mmproj name; tied embeddings: no output.weight, as published.
    assert result.mmproj_path.name == "mmproj-minicpm-ocr-1.0-F16.gguf"
    assert "output.weight" not in {t.name for t in GGUFReader(result.llm_path).tensors}
    other = runtime("16x", "f16")
    assert other.vision.piece_align == 56 and other.conversion.mmproj_path.name == "mmproj-minicpm-ocr-1.0-16x-F16.gguf"


@pytest.mark.parametrize("mode", ["4x", "16x"])
@pytest.mark.parametrize("upsize", ["always", "never"])
def test_layout_matches_published_processor(mode: str, upsize: str, checkpoint: Path, runtime) -> None:  # noqa: ANN001
    assert_layout_matches(runtime(mode, "f16"), processor(checkpoint, mode, upsize), SIZES, QUESTION,
                          small_image_upsize=upsize)


@pytest.mark.parametrize("mode", ["4x", "16x"])
def test_adaptive_layout_matches_published_processor(mode: str, checkpoint: Path, runtime) -> None:  # noqa: ANN001
    from minicpmv_edge.runtime.slicing import SCALE_RESOLUTION, TINY_RESOLUTION

    model = runtime(mode, "f16")
    vision = CountingVision(model.vision)
    align = model.vision.piece_align
    published = processor(checkpoint, mode, "adaptive")
    tokenizer = published.tokenizer
    prompt = one_image_prompt(tokenizer, QUESTION)
    layouts = {name: vision.layout(image.size, 9, "adaptive", image=image) for name, image in ADAPTIVE_PAGES.items()}
    # The branches are hit: upsized, tiny, native, re-cut slices of unequal sizes, and none re-cut.
    area = {name: layout.overview[0] * layout.overview[1] for name, layout in layouts.items()}
    assert area["dense small text"] > 0.8 * SCALE_RESOLUTION ** 2
    assert area["tiny"] <= (TINY_RESOLUTION + align) ** 2
    assert layouts["large text"].overview == (round(400 / align) * align, round(300 / align) * align)
    for name in ("unequal", "aligned"):
        recut = layouts[name].recut
        assert recut and None in recut and any(recut), name
        assert len(set(layouts[name].slice_sizes)) > 1, name
    assert layouts["aligned"].recut[1] is not None and layouts["aligned"].recut[1].size == (336, 336)
    assert layouts["big"].grid == (3, 3) and layouts["big"].recut == ()
    cases = [(name, image, slices) for name, image in ADAPTIVE_PAGES.items() for slices in (1, 9)]
    cases += [(name, random_image(size, 1), 9) for name, size in SIZES.items()]
    for name, image, max_slice_nums in cases:
        items, _ = model.prompt.build([{"role": "user", "content": [image, QUESTION]}], vision,
                                      max_slice_nums=max_slice_nums, small_image_upsize="adaptive")
        expected = published(text=[prompt], images=[image], max_slice_nums=max_slice_nums, return_tensors="np")
        assert image_ids(items, tokenizer.image_token_id) == expected["input_ids"][0].tolist(), (name, max_slice_nums)


def test_adaptive_without_opencv_is_one_line(runtime, monkeypatch) -> None:  # noqa: ANN001
    from minicpmv_edge.runtime.slicing import MISSING_OPENCV

    model = runtime("4x", "f16")
    monkeypatch.setitem(sys.modules, "cv2", None)   # `import cv2` raises ImportError
    msgs = [{"role": "user", "content": [ADAPTIVE_PAGES["large text"], QUESTION]}]
    with pytest.raises(ChatInputError) as raised:
        model.prepare(msgs, small_image_upsize="adaptive")
    assert str(raised.value) == MISSING_OPENCV == \
        "small_image_upsize 'adaptive' needs OpenCV: pip install 'minicpmv-edge[ocr]'"
    model.prepare(msgs, small_image_upsize="never")   # the other modes do not need it


def test_cli_ask_takes_small_image_upsize(runtime, monkeypatch, tmp_path: Path) -> None:  # noqa: ANN001
    from typer.testing import CliRunner

    from minicpmv_edge.cli.main import app

    result = runtime("4x", "f16").conversion
    image = tmp_path / "page.png"
    ADAPTIVE_PAGES["large text"].save(image)
    args = ["ask", str(result.llm_path), str(result.mmproj_path), QUESTION, "-i", str(image), "-n", "2", "-t", "1"]
    assert CliRunner().invoke(app, [*args, "--small-image-upsize", "adaptive"]).exit_code == 0
    bad = CliRunner().invoke(app, [*args, "--small-image-upsize", "sometimes"])
    assert bad.exit_code == 1 and "none of MiniCPM-OCR 1.0's modes" in bad.stderr
    monkeypatch.setitem(sys.modules, "cv2", None)
    missing = CliRunner().invoke(app, [*args, "--small-image-upsize", "adaptive"])
    assert missing.exit_code == 1
    assert missing.stderr == "error: small_image_upsize 'adaptive' needs OpenCV: pip install 'minicpmv-edge[ocr]'\n"


def test_unknown_upsize_is_one_clear_error(runtime) -> None:  # noqa: ANN001
    model = runtime("4x", "f16")
    msgs = [{"role": "user", "content": [random_image((100, 80), 1), QUESTION]}]
    with pytest.raises(ChatInputError, match="none of MiniCPM-OCR 1.0's modes"):
        model.prepare(msgs, small_image_upsize="sometimes")


@pytest.mark.parametrize(("mode", "upsize"), [("4x", "always"), ("4x", "never"), ("16x", "never"),
                                           ("4x", "adaptive")])
def test_image_features_match_transformers(mode: str, upsize: str, checkpoint: Path, reference,  # noqa: ANN001
                                           runtime) -> None:  # noqa: ANN001
    from minicpmv_edge.runtime.slicing import cut, plan_slices

    model = runtime(mode, "f16")
    images = images_processor(checkpoint, mode, upsize)
    cases = {name: random_image(size, 2) for name, size in SIZES.items()}
    if upsize == "adaptive":   # pages sliced unequally: re-cut cells resized and kept as they are
        cases = {name: ADAPTIVE_PAGES[name] for name in ("unequal", "aligned")}
    for name, image in cases.items():
        pixels = images(image, return_tensors="pt")
        pieces = cut(image, plan_slices(image.size, 9, model.vision.piece_align, upsize, image))
        assert_piece_features_match(model.vision.encoder.encode, reference, pixels, pieces, mode, name)


def _logits_and_greedy(model, reference, checkpoint: Path, mode: str, upsize: str,  # noqa: ANN001
                       image: Image.Image) -> None:
    msgs = [{"role": "user", "content": [image, QUESTION]}]
    items, _ = model.prepare(msgs, small_image_upsize=upsize)
    ids = torch.tensor([image_ids(items, reference.config.image_token_id)])
    pixels = images_processor(checkpoint, mode, upsize)(image, return_tensors="pt")
    inputs = dict(pixel_values=pixels["pixel_values"], target_sizes=pixels["target_sizes"], downsample_mode=mode)
    with torch.no_grad():
        expected = reference(input_ids=ids, **inputs).logits[0].float().numpy()
        expected_tokens = reference.generate(input_ids=ids, **inputs, max_new_tokens=32, do_sample=False)[0]
    ours = np.zeros_like(expected)
    model.reset()

    def keep(start: int, rows: np.ndarray) -> None:
        ours[start:start + len(rows)] = rows[:, : expected.shape[1]]

    model.engine.feed(items, model.embeddings, on_logits=keep)
    assert (ours.argmax(-1) == expected.argmax(-1)).all()
    assert np.abs(ours - expected).max() < 0.01, float(np.abs(ours - expected).max())
    tokens = [r.token for r in model.stream_generate(msgs, max_new_tokens=32, small_image_upsize=upsize)]
    assert tokens == expected_tokens[ids.shape[1]:].tolist()


@pytest.mark.parametrize(("upsize", "size"), [("always", (700, 500)), ("never", (320, 180))])
def test_logits_and_greedy_generation_match_transformers(upsize: str, size: tuple[int, int], checkpoint: Path,
                                                         reference, runtime) -> None:  # noqa: ANN001
    _logits_and_greedy(runtime("4x", "f32"), reference, checkpoint, "4x", upsize, random_image(size, 3))


def test_follow_up_turn_equals_a_fresh_model_and_transformers(checkpoint: Path, reference, runtime) -> None:  # noqa: ANN001
    """A second turn (a new page) after a cached first one: what a fresh model and transformers give."""
    follow_up, reused, items = follow_up_turn(runtime("4x", "f32"), (300, 700), QUESTION)
    ids = torch.tensor([image_ids(items, reference.config.image_token_id)])
    images = message_images(follow_up)
    pixels = images_processor(checkpoint, "4x", "always")(images, return_tensors="pt")
    with torch.no_grad():
        expected = reference.generate(input_ids=ids, pixel_values=pixels["pixel_values"],
                                      target_sizes=pixels["target_sizes"], downsample_mode="4x", max_new_tokens=8,
                                      do_sample=False)[0]
    assert reused == expected[ids.shape[1]:].tolist()


def _copy_with(checkpoint: Path, out: Path, preprocessor: dict | None = None) -> Path:
    shutil.copytree(checkpoint, out, dirs_exist_ok=True)
    if preprocessor:
        path = out / "preprocessor_config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **preprocessor}))
    return out


def test_upsize_default_comes_from_the_preprocessor_config(checkpoint: Path, tmp_path: Path) -> None:
    folder = _copy_with(checkpoint, tmp_path / "never", {"small_image_upsize": "never"})
    result = convert_checkpoint(folder, tmp_path / "out", "q8_0")
    assert result.mmproj_path.name == "mmproj-never-F16.gguf"   # 4x, the checkpoint's default: the plain name
    with load(result.llm_path, result.mmproj_path) as model:
        assert model.settings.small_image_upsize == "never"
        image = random_image((300, 200), 1)
        default, _ = model.prepare([{"role": "user", "content": [image, QUESTION]}])
        never, _ = model.prepare([{"role": "user", "content": [image, QUESTION]}], small_image_upsize="never")
        always, _ = model.prepare([{"role": "user", "content": [image, QUESTION]}], small_image_upsize="always")
        assert len(default) == len(never) < len(always)   # 308x196 native vs about 448^2


def test_untied_output_is_converted(checkpoint: Path, tmp_path: Path) -> None:
    """A checkpoint with its own `lm_head.weight` (top level, outside the LLM prefix) becomes `output.weight`, and
    the converted model answers as transformers does."""
    config = transformers.AutoConfig.from_pretrained(checkpoint)
    config.tie_word_embeddings = config.text_config.tie_word_embeddings = False
    model = transformers.MiniCPMOcrForConditionalGeneration.from_pretrained(checkpoint, config=config,
                                                                          dtype=torch.float32)
    torch.manual_seed(7)
    with torch.no_grad():
        model.lm_head.weight.normal_(0, 0.1)
    folder = _copy_with(checkpoint, tmp_path / "untied")
    model.save_pretrained(folder)
    result = convert_checkpoint(folder, tmp_path / "out", "f32")
    reader = GGUFReader(result.llm_path)
    output = next(t for t in reader.tensors if t.name == "output.weight")
    np.testing.assert_array_equal(np.asarray(output.data).reshape(model.lm_head.weight.shape),
                                  model.lm_head.weight.detach().numpy())
    with load(result.llm_path, result.mmproj_path) as ours:
        _logits_and_greedy(ours, model.eval(), folder, "4x", "always", random_image((500, 300), 4))


def test_registry_entry() -> None:
    family = get(FAMILY)
    assert family.small_image_upsize == ("always", "never", "adaptive")
    assert family.layout.lm_head == "lm_head.weight" and family.projector == "minicpmv4_6"


def test_batch_ocr_takes_the_sizing_mode_and_keeps_modes_apart(runtime, tmp_path: Path) -> None:  # noqa: ANN001
    from minicpmv_edge.runtime.ocr import OcrOptions, job_key, run_batch

    model = runtime("4x", "f16")
    page = tmp_path / "small.png"
    random_image((200, 120), 4).save(page)
    output = tmp_path / "pages.jsonl"
    for upsize in (None, "never", "always"):
        summary = run_batch(model, [str(page)], output, OcrOptions(max_new_tokens=2, small_image_upsize=upsize))
        assert summary.done == 1  # a mode named or not is a job of its own, never served from another's pages
    records = [json.loads(line) for line in output.read_text().splitlines()]
    assert [r["small_image_upsize"] for r in records] == ["always", "never", "always"]
    assert len({r["key"] for r in records}) == 3
    # Jobs started before the option existed keep their keys.
    assert job_key("h", "m", OcrOptions()) == job_key("h", "m", OcrOptions(small_image_upsize=None))
    assert run_batch(model, [str(page)], output, OcrOptions(max_new_tokens=2, small_image_upsize="never")).skipped == 1
