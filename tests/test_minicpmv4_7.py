"""MiniCPM-V 4.7 end to end against transformers' own implementation (`transformers.models.minicpmv4_7`) on the
same tiny synthetic weights: the converter (canvas rope sections and marker key, untied output, refused
kernels), the published processor's token layout, and the model's numbers with canvas M-RoPE.

4.7's processor uses 4.6's image processor (transformers 5.23 ships no 4.7 one); the PIL one,
`MiniCPMV4_6ImageProcessorPil`, needs no torchvision. The tiny text model has head_dim 32 (4 rotary pairs:
T, H, W, T), so both canvas axes move the logits.

Stated tolerances:
- canvas positions: identical to `MiniCPMV4_7Model.get_rope_index` (T, H, W) for every prompt below;
- token layout: identical ids to the published `MiniCPMV4_7Processor` for five image shapes and four
  `max_slice_nums`, both downsample modes;
- image features: per-token cosine >= 0.999 between clip.cpp (F16 mmproj) and transformers' vision path;
- logits of an image + text prompt (F32 GGUF): the same argmax at every position and |difference| < 0.01
  (measured 0.0003), 32 greedy tokens equal `generate`'s, a follow-up turn equal to a fresh model's and to
  transformers'. The same comparison with sequential positions must miss the tolerance (measured 0.06 and
  wrong argmaxes): the canvas is what makes it pass.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGUFReader, GGUFWriter
from official import (assert_layout_matches, assert_piece_features_match, follow_up_turn, image_ids, image_prompt,
                      message_images, one_image_prompt, published_processor_class, random_image)

from minicpmv_edge.convert import ConversionError, convert_checkpoint
from minicpmv_edge.families import get
from minicpmv_edge.families.minicpmv4_7 import CANVAS_KEY
from minicpmv_edge.runtime import load
from minicpmv_edge.runtime.canvas_rope import Markers, canvas_positions
from minicpmv_edge.runtime.engine import EngineError

transformers = pytest.importorskip("transformers")
from transformers.models.minicpmv4_6.image_processing_pil_minicpmv4_6 import MiniCPMV4_6ImageProcessorPil  # noqa: E402
from transformers.models.minicpmv4_6.video_processing_minicpmv4_6 import MiniCPMV4_6VideoProcessor  # noqa: E402
from transformers.models.minicpmv4_7.processing_minicpmv4_7 import MiniCPMV4_7Processor  # noqa: E402

FAMILY = "minicpm-v-4.7"
MODES = ("16x", "4x")
SIZES = {"small": (300, 200), "tiny": (60, 40), "wide": (1200, 400), "tall": (400, 1100), "large": (1500, 1300)}
QUESTION = "Read the text."
PublishedProcessor = published_processor_class(MiniCPMV4_7Processor)


def processor(checkpoint: Path, mode: str, **options: object) -> PublishedProcessor:
    images = MiniCPMV4_6ImageProcessorPil.from_pretrained(checkpoint, downsample_mode=mode, **options)
    return PublishedProcessor(image_processor=images, video_processor=MiniCPMV4_6VideoProcessor(),
                              tokenizer=transformers.AutoTokenizer.from_pretrained(checkpoint))


def markers(checkpoint: Path) -> Markers:
    config = json.loads((checkpoint / "config.json").read_text())
    return Markers(*(config[key] for key in ("image_start_id", "image_end_id", "slice_start_id", "slice_end_id",
                                             "newline_id")))


def test_registry_and_conversion(checkpoint: Path, runtime) -> None:  # noqa: ANN001
    family = get(FAMILY)
    assert family.positions == "canvas" and family.projector == "minicpmv4_6"
    model = runtime("16x", "f32")
    assert model.family == FAMILY and model.vision.piece_align == 56
    fields = GGUFReader(model.conversion.llm_path).fields
    # T moved from section 0 to the fourth: 4 rotary pairs are T, H, W, T, i.e. [2, 1, 1, 0] -> [0, 1, 1, 2].
    assert fields["qwen35.rope.dimension_sections"].contents() == [0, 1, 1, 2]
    assert list(fields[CANVAS_KEY].contents()) == list(markers(checkpoint).__dict__.values())
    assert "canvas M-RoPE" in fields["general.description"].contents()
    tensors = {t.name for t in GGUFReader(model.conversion.llm_path).tensors}
    assert "output.weight" in tensors   # untied, as MiniCPMV4_7Config's default
    assert GGUFReader(model.conversion.mmproj_path).fields["clip.projector_type"].contents() == "minicpmv4_6"


@pytest.mark.parametrize(("section", "key", "value", "needle"), [
    ("vision_config", "window_kernel_size", [3, 3], "window_kernel_size [3, 3] is not 2x2"),
    (None, "merge_kernel_size", [2, 1], "merge_kernel_size [2, 1] is not 2x2"),
    (None, "merger_times", 2, "merger_times 2 is not 1"),
    (None, "newline_id", None, "lacks newline_id"),
])
def test_unsupported_checkpoints_are_refused_in_one_line(section: str | None, key: str, value: object, needle: str,
                                                         checkpoint: Path, tmp_path: Path) -> None:
    folder = Path(shutil.copytree(checkpoint, tmp_path / "ckpt"))
    config = json.loads((folder / "config.json").read_text())
    target = config if section is None else config[section]
    target.pop(key) if value is None else target.__setitem__(key, value)
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConversionError) as raised:
        convert_checkpoint(folder, tmp_path / "out", "f16")
    assert needle in str(raised.value) and "\n" not in str(raised.value)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def _transformers_inputs(checkpoint: Path, mode: str, images: list, prompt: str, max_slice_nums: int = 9,
                         **options: object) -> dict:
    return processor(checkpoint, mode, **options)(text=[prompt], images=[images], max_slice_nums=max_slice_nums,
                                                  return_tensors="pt", downsample_mode=mode)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("use_image_id", [True, False])
def test_canvas_positions_match_transformers(mode: str, use_image_id: bool, checkpoint: Path, reference) -> None:
    """Our canvas positions against `get_rope_index` on the processor's own prompts: one or two images, sliced or
    not, with image ids (text between images) or without (two frames in one group)."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(checkpoint)
    merge = 4 if mode == "16x" else 2
    pad = tokenizer.image_token
    prompts = {1: one_image_prompt(tokenizer, QUESTION), 2: one_image_prompt(tokenizer, f"{pad}\n{QUESTION}"),
               "adjacent": one_image_prompt(tokenizer, f"{pad}{QUESTION}")}
    for name in ("small", "wide", "large"):
        for max_slice_nums in (1, 9, 16):
            for count, prompt in prompts.items():
                images = [random_image(SIZES[name], 1)] + ([random_image((500, 300), 2)] if count != 1 else [])
                inputs = _transformers_inputs(checkpoint, mode, images, prompt, max_slice_nums,
                                              use_image_id=use_image_id)
                with torch.no_grad():
                    expected, _ = reference.model.get_rope_index(
                        inputs["input_ids"], mm_token_type_ids=inputs["mm_token_type_ids"],
                        target_sizes=inputs["target_sizes"], downsample_mode=mode)
                ids, types = inputs["input_ids"][0].tolist(), inputs["mm_token_type_ids"][0].tolist()
                crops = iter((inputs["target_sizes"] // merge).tolist())
                grids, grid = [], None
                for index, kind in enumerate(types):
                    if kind and (index == 0 or not types[index - 1]):
                        grid = tuple(next(crops))
                    grids.append(grid if kind else None)
                ours = canvas_positions([i if not kind else -1 for i, kind in zip(ids, types)], grids,
                                        markers(checkpoint))
                assert (ours == expected[:, 0].numpy()).all(), (name, max_slice_nums, count)


@pytest.mark.parametrize("mode", MODES)
def test_layout_matches_published_processor(mode: str, checkpoint: Path, runtime) -> None:  # noqa: ANN001
    assert_layout_matches(runtime(mode, "f16"), processor(checkpoint, mode), SIZES, QUESTION)


@pytest.mark.parametrize("mode", MODES)
def test_image_features_match_transformers(mode: str, checkpoint: Path, reference, runtime) -> None:  # noqa: ANN001
    from minicpmv_edge.runtime.slicing import cut, plan_slices

    model = runtime(mode, "f16")
    images = MiniCPMV4_6ImageProcessorPil.from_pretrained(checkpoint, downsample_mode=mode)
    for name in ("small", "wide"):
        image = random_image(SIZES[name], 2)
        pieces = cut(image, plan_slices(image.size, 9, model.vision.piece_align))
        assert_piece_features_match(model.vision.encoder.encode, reference, images(image, return_tensors="pt"),
                                    pieces, mode, name)


class SequentialPositions:
    """The mutant: the canvas plan's rows with plain sequential positions in every section."""

    def __init__(self, plan) -> None:  # noqa: ANN001
        self.token_rows = plan.token_rows

    def positions(self, items) -> np.ndarray:  # noqa: ANN001
        index = np.arange(len(items), dtype=np.int32)
        return np.stack([index] * 4, axis=1)


def _reference_run(reference, checkpoint: Path, mode: str, ids: torch.Tensor, images: list,  # noqa: ANN001
                   tokens: int = 32) -> tuple[np.ndarray, list[int]]:
    pixels = MiniCPMV4_6ImageProcessorPil.from_pretrained(checkpoint, downsample_mode=mode)(images, return_tensors="pt")
    inputs = dict(pixel_values=pixels["pixel_values"], target_sizes=pixels["target_sizes"], downsample_mode=mode,
                  mm_token_type_ids=(ids == reference.config.image_token_id).int())
    with torch.no_grad():
        logits = reference(input_ids=ids, **inputs).logits[0].float().numpy()
        generated = reference.generate(input_ids=ids, **inputs, max_new_tokens=tokens, do_sample=False)[0]
    return logits, generated[ids.shape[1]:].tolist()


@pytest.mark.parametrize("mode", MODES)
def test_logits_and_greedy_generation_match_transformers(mode: str, checkpoint: Path, reference,
                                                         runtime) -> None:  # noqa: ANN001
    model = runtime(mode, "f32")
    image = random_image((700, 500), 3)
    msgs, items, ids = image_prompt(model, reference.config.image_token_id, image, QUESTION)
    expected, expected_tokens = _reference_run(reference, checkpoint, mode, ids, [image])

    ours = model.prompt_logits(items)[:, : expected.shape[1]]
    assert (ours.argmax(-1) == expected.argmax(-1)).all()
    assert np.abs(ours - expected).max() < 0.01, float(np.abs(ours - expected).max())
    # transformers' greedy run stops after 32 tokens or at (and including) an end token: ours must be all of it
    assert [record.token for record in model.stream_generate(msgs, max_new_tokens=32)] == expected_tokens

    # The mutant: the same rows at sequential positions must not pass the same comparison.
    mutant = np.zeros_like(ours)
    model.reset()

    def keep(start: int, rows: np.ndarray) -> None:
        mutant[start:start + len(rows)] = rows[:, : expected.shape[1]]

    model.engine.feed(list(items), model.embeddings, on_logits=keep,
                      plan=SequentialPositions(model.position_plan(items)))
    assert np.abs(mutant - expected).max() >= 0.01 or (mutant.argmax(-1) != expected.argmax(-1)).any()


def test_follow_up_turn_equals_a_fresh_model_and_transformers(checkpoint: Path, reference, runtime) -> None:  # noqa: ANN001
    """The second turn reuses the cached first one (its canvas positions included); its answer is what a fresh
    model and transformers give for the whole conversation."""
    follow_up, reused, items = follow_up_turn(runtime("16x", "f32"), (900, 300), QUESTION)
    ids = torch.tensor([image_ids(items, reference.config.image_token_id)])
    images = message_images(follow_up)
    assert reused == _reference_run(reference, checkpoint, "16x", ids, images, tokens=8)[1]


def _rewritten(source: Path, target: Path, drop: tuple[str, ...] = (), strings: dict[str, str] | None = None) -> Path:
    """A copy of a GGUF without the keys starting with `drop` and with string keys replaced by `strings`."""
    reader = GGUFReader(source)
    arch = reader.fields["general.architecture"].contents()
    writer = GGUFWriter(target, arch)
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture" or name.startswith(drop):
            continue
        if name in (strings or {}):
            writer.add_string(name, strings[name])
            continue
        sub_type = field.types[1] if len(field.types) > 1 else None
        writer.add_key_value(name, field.contents(), field.types[0], sub_type=sub_type)
    for tensor in reader.tensors:
        writer.add_tensor(tensor.name, tensor.data, raw_shape=tensor.data.shape, raw_dtype=tensor.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return target


def test_files_without_canvas_positions_are_refused_in_one_line(runtime, tmp_path: Path) -> None:  # noqa: ANN001
    result = runtime("16x", "f16").conversion
    # Our family key but no canvas marker.
    unmarked = _rewritten(result.llm_path, tmp_path / "unmarked.gguf", drop=(CANVAS_KEY,))
    # What llama.cpp's newer converter writes: no minicpmv_edge keys, the mmproj as projector "minicpmv4_7".
    foreign_llm = _rewritten(result.llm_path, tmp_path / "llamacpp.gguf", drop=("minicpmv_edge.",))
    foreign_mmproj = _rewritten(result.mmproj_path, tmp_path / "mmproj-llamacpp.gguf",
                                strings={"clip.projector_type": "minicpmv4_7"})
    for llm, mmproj in ((unmarked, result.mmproj_path), (foreign_llm, foreign_mmproj)):
        with pytest.raises(EngineError) as raised:
            load(llm, mmproj)
        message = str(raised.value)
        assert "MiniCPM-V 4.7" in message and "canvas M-RoPE" in message and "\n" not in message
