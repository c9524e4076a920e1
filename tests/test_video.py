"""Video: frame sampling (PyAV) against the published algorithms restated here, the 3D-resampler prompt
layout against the published MiniCPM-V 4.5 processor's rules, greedy answers against the torch reference,
MiniCPM-V 4.6 video against transformers' own processor and model; the one-line errors.

Published code restated (not imported: the model card's function needs decord and scipy):
- the 4.5 model card's `encode_video(path, choose_fps, force_packing)` (MAX_NUM_FRAMES 180, MAX_NUM_PACKING 3,
  TIME_SCALE 0.1, `uniform_sample`, `map_to_nearest_scale`, `group_array`);
- the 4.5 `processing_minicpmv.py` / `image_processing_minicpmv.py`: with temporal_ids, a group's later frames
  (`skip_image_idx`) get an empty placeholder and the text before each of them is stripped; the group's first
  frame gets the usual placeholder (`<image>` + 64 `<unk>` + `</image>`, max_slice_nums=1, use_image_id=False).

Stated tolerances: greedy tokens of 2 groups of 3 frames equal the reference's choice on the same prefix up to
a near-tie (2e-3 logits; F32 GGUF, F16 KV cache), logits within 0.05; 4.6 logits within 0.01 with the same
argmax (as tests/test_minicpmv4_6.py).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from official import random_image

from minicpmv_edge.runtime import ChatInputError, VideoInputError, load
from minicpmv_edge.runtime import video as video_module
from minicpmv_edge.runtime.video import Video, VideoInfo, packing_plan, per_second_plan, sample

av = pytest.importorskip("av")

FAMILY = "minicpm-v-4.5"
QUESTION = "Describe the video"


def write_clip(path: Path, seconds: float, fps: int, size: tuple[int, int] = (96, 64)) -> Path:
    """An MPEG-4 clip whose frame i is flat grey level (8 * i) % 256 in its left half (mid grey right), so a
    decoded frame tells its index."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = size[0], size[1], "yuv420p"
        stream.codec_context.qscale = 1
        stream.codec_context.flags |= av.codec.context.Flags.qscale  # near-lossless, so levels survive
        for i in range(round(seconds * fps)):
            pixels = np.full((size[1], size[0], 3), 128, dtype=np.uint8)
            pixels[:, : size[0] // 2] = (8 * i) % 256
            frame = av.VideoFrame.from_ndarray(pixels, format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return path


def frame_level(image) -> float:  # noqa: ANN001
    return float(np.asarray(image.convert("L"))[:, : image.width // 4].mean())


# ---- the model card's encode_video, restated --------------------------------------------------------------

def model_card_plan(n_frames: int, fps: float, choose_fps: float, force_packing: int | None = None):  # noqa: ANN201
    max_num_frames, max_num_packing, time_scale = 180, 3, 0.1
    video_duration = n_frames / fps
    if choose_fps * int(video_duration) <= max_num_frames:
        packing_nums = 1
        choose_frames = round(min(choose_fps, round(fps)) * min(max_num_frames, video_duration))
    else:
        packing_nums = math.ceil(video_duration * choose_fps / max_num_frames)
        if packing_nums <= max_num_packing:
            choose_frames = round(video_duration * choose_fps)
        else:
            choose_frames = round(max_num_frames * max_num_packing)
            packing_nums = max_num_packing
    frame_idx = list(range(n_frames))
    gap = len(frame_idx) / choose_frames
    frame_idx = np.array([frame_idx[int(i * gap + gap / 2)] for i in range(choose_frames)])
    if force_packing:
        packing_nums = min(force_packing, max_num_packing)
    scale = np.arange(0, video_duration, time_scale)
    nearest = np.array([scale[np.argmin(np.abs(scale - t))] for t in frame_idx / fps])  # map_to_nearest_scale
    frame_ts_id = (nearest / time_scale).astype(np.int32)
    groups = [frame_ts_id[i:i + packing_nums].tolist() for i in range(0, len(frame_ts_id), packing_nums)]
    return frame_idx.tolist(), groups


@pytest.mark.parametrize("n_frames, fps, choose_fps, force", [
    (100, 25.0, 5, None),  # 4 s: one frame per group
    (600, 30.0, 5, 3),  # 20 s forced to groups of 3 (the benchmark's clip)
    (1500, 25.0, 5, None),  # 60 s: 300 frames > 180, packed by 2
    (6000, 30.0, 5, None),  # 200 s: packing would be 6 > 3, capped at 540 frames in groups of 3
    (7, 2.0, 3, None),  # shorter than fps: min(choose_fps, round(fps))
    (301, 29.97, 10, 2),
])
def test_packing_plan_equals_the_model_card(n_frames: int, fps: float, choose_fps: float, force) -> None:  # noqa: ANN001
    assert packing_plan(VideoInfo(n_frames, fps), choose_fps, force) == model_card_plan(n_frames, fps, choose_fps,
                                                                                        force)


def test_sampled_clip_frames_ids_and_groups(tmp_path: Path) -> None:
    clip = write_clip(tmp_path / "clip.mp4", 4.0, 10)
    sampled = sample(Video(clip, fps=5, packing=3), "temporal")
    indices, groups = model_card_plan(40, 10.0, 5, 3)
    assert sampled.info == VideoInfo(40, 10.0)
    assert sampled.temporal_ids == groups and [len(g) for g in groups] == [3] * 6 + [2]
    assert [frame_level(f) for f in sampled.frames] == pytest.approx([(8 * i) % 256 for i in indices], abs=3)
    assert sampled.frames[0].size == (96, 64)


# ---- MiniCPM-V 4.6: transformers' video processor ---------------------------------------------------------

def processor_46_video():  # noqa: ANN201 - MiniCPMV4_6VideoProcessor whose resize needs no torchvision
    """transformers' MiniCPMV4_6VideoProcessor, its sampling, stacking, layout and normalisation untouched;
    only `resize` and `normalize` (torchvision's, not installed here) are done by PIL bicubic (as the runtime
    and the 4.6 PIL image processor resize) and by (x - mean) / std."""
    import torch
    from PIL import Image
    from transformers.models.minicpmv4_6.video_processing_minicpmv4_6 import MiniCPMV4_6VideoProcessor

    class PilResize(MiniCPMV4_6VideoProcessor):
        def resize(self, video, size, resample=None, **kwargs):  # noqa: ANN001, ANN201, ANN003
            flat = video.reshape(-1, *video.shape[-3:])
            out = [torch.from_numpy(np.asarray(Image.fromarray(f.permute(1, 2, 0).numpy()).resize(
                (size.width, size.height), Image.Resampling.BICUBIC))).permute(2, 0, 1) for f in flat]
            return torch.stack(out).reshape(*video.shape[:-2], size.height, size.width)

        def normalize(self, image, mean, std, inplace=False, **kwargs):  # noqa: ANN001, ANN201, ANN003
            shape = (-1, 1, 1)
            return (image - torch.as_tensor(mean).reshape(shape)) / torch.as_tensor(std).reshape(shape)

    return PilResize


@pytest.mark.parametrize("n_frames, fps, max_frames, stack", [
    (50, 10.0, 128, 1), (47, 10.0, 128, 3), (90, 30.0, 2, 1), (200, 25.0, 5, 4), (31, 10.0, 128, 2)])
def test_per_second_plan_equals_transformers(n_frames: int, fps: float, max_frames: int, stack: int) -> None:
    from transformers.video_utils import VideoMetadata

    processor = processor_46_video()()
    metadata = VideoMetadata(total_num_frames=n_frames, fps=fps, duration=n_frames / fps)
    expected = processor.sample_frames(metadata, max_num_frames=max_frames, stack_frames=stack)
    main, stacked = per_second_plan(VideoInfo(n_frames, fps), max_frames, stack)
    subs = [i for group in stacked for i in group]
    assert main == expected[:len(main)]
    # _preprocess pairs the i-th main frame with second i's composite: when main frames are thinned (a video
    # longer than max_num_frames seconds), the later seconds' sub-frames are decoded there but never used
    assert subs == expected[len(main):len(main) + len(subs)]
    if n_frames / fps <= max_frames:
        assert len(main) + len(subs) == len(expected)


def test_stack_composite_equals_transformers() -> None:
    import torch

    processor = processor_46_video()()
    for count, size in ((2, (40, 30)), (3, (40, 30)), (3, (20, 60)), (4, (28, 28)), (5, (10, 10))):
        frames = [random_image(size, seed) for seed in range(count)]
        video = torch.stack([torch.from_numpy(np.array(f)).permute(2, 0, 1) for f in frames])
        expected = processor.concat_frames_as_image(video)[0].permute(1, 2, 0).numpy()
        assert np.array_equal(np.asarray(video_module.stack_composite(frames)), expected), (count, size)


# ---- errors: one line each -------------------------------------------------------------------------------

def test_missing_extra_unreadable_empty_and_too_long(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(b"not a video at all" * 100)
    with pytest.raises(VideoInputError, match="not a video PyAV can read|no video stream|cannot decode"):
        sample(Video(garbage), "temporal")
    with pytest.raises(VideoInputError, match="video not found"):
        sample(Video(tmp_path / "absent.mp4"), "temporal")
    empty = tmp_path / "empty.mp4"
    with av.open(str(empty), "w") as container:  # a header and no frame
        stream = container.add_stream("mpeg4", rate=10)
        stream.width, stream.height = 32, 32
        container.start_encoding()
    with pytest.raises(VideoInputError, match="zero-length"):
        sample(Video(empty), "temporal")
    clip = write_clip(tmp_path / "clip.mp4", 2.0, 10)
    monkeypatch.setattr(video_module, "MAX_VIDEO_SECONDS", 1.0)
    with pytest.raises(VideoInputError, match="lasts 2 s"):
        sample(Video(clip), "temporal")
    monkeypatch.setitem(sys.modules, "av", None)  # `import av` raises ImportError
    with pytest.raises(VideoInputError, match=r"pip install 'minicpmv-edge\[video\]'"):
        sample(Video(clip), "temporal")


def minicpmv(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "minicpmv_edge.cli.main", *args], capture_output=True, text=True)


def test_cli_video_errors_are_one_line(tmp_path: Path, converted) -> None:  # noqa: ANN001
    folder = str(converted(FAMILY, "f32").llm_path.parent)
    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(b"\x00" * 4096)
    for video, message in ((garbage, "not a video PyAV can read"), (tmp_path / "absent.mp4", "video not found")):
        result = minicpmv("ask", folder, "--video", str(video), "q")
        assert result.returncode == 1 and result.stderr.startswith("error: ") and message in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    clip = str(write_clip(tmp_path / "c.mp4", 1.0, 10))
    usage = minicpmv("ask", folder, "--video", clip, "--packing", "9", "q")
    assert usage.returncode == 2 and "Traceback" not in usage.stderr


@pytest.mark.parametrize("video_family, options", [(FAMILY, ["--fps", "3", "--packing", "3"]),
                                             ("minicpm-o-4.5", ["--packing", "2"]), ("minicpm-v-4.6", [])])
def test_cli_answers_about_a_video(video_family: str, options: list[str], tmp_path: Path, converted) -> None:  # noqa: ANN001
    clip = write_clip(tmp_path / "clip.mp4", 2.0, 10)
    result = minicpmv("ask", str(converted(video_family, "f32").llm_path.parent), "--video", str(clip), *options,
                      "-n", "4", "--json", QUESTION)
    assert result.returncode == 0, result.stderr
    timings = json.loads(result.stdout)["timings"]
    assert timings["generation_tokens"] >= 1 and timings["prompt_tokens"] > 64


# ---- MiniCPM-V 4.5: the published layout and the torch reference ---------------------------------------

@pytest.fixture(scope="module")
def model45(converted):  # noqa: ANN001, ANN201
    model = load(converted(FAMILY, "f32").llm_path.parent, n_ctx=1024)
    yield model
    model.close()


GROUPS = [[0, 3, 6], [10, 13, 16]]  # 2 groups of 3 frames, temporal ids in 0.1 s ticks


def frames_and_msgs() -> tuple[list, list]:
    frames = [random_image((120, 90), seed) for seed in range(6)]
    return frames, [{"role": "user", "content": frames + [QUESTION]}]


def published_layout_ids(folder: Path, msgs: list, temporal_ids: list[list[int]], hf_tokenizer) -> tuple[list[int], int]:  # noqa: ANN001
    """Token ids as the published 4.5 processor lays out `msgs` with temporal_ids (see the module docstring)."""
    from tokenizers import Tokenizer

    marker = "(<image>./</image>)"
    preprocessor = json.loads((folder / "preprocessor_config.json").read_text())
    content = "\n".join(p if isinstance(p, str) else marker for p in msgs[0]["content"])
    text = hf_tokenizer(folder).apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                                     add_generation_prompt=True, enable_thinking=False)
    chunks = text.split(marker)
    skip, start = set(), 0
    for group in temporal_ids:
        skip.update(range(start + 1, start + len(group)))
        start += len(group)
    placeholder = preprocessor["im_start"] + preprocessor["unk"] * preprocessor["image_feature_size"] \
        + preprocessor["im_end"]
    final = "".join(chunk.strip() if i in skip else chunk + placeholder for i, chunk in enumerate(chunks[:-1]))
    final += chunks[-1]
    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    return tokenizer.encode(final, add_special_tokens=False).ids, tokenizer.token_to_id(preprocessor["unk"])


def test_temporal_prompt_layout_equals_published(model45, tiny_checkpoint, hf_tokenizer,  # noqa: ANN001
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tiny_checkpoint(FAMILY)
    frames, msgs = frames_and_msgs()
    calls = []

    def fake_group(key, pieces, temporal_ids):  # noqa: ANN001, ANN202 - layout only: rows, not values
        calls.append((len(pieces()), list(temporal_ids)))
        return np.zeros((64, model45.engine.n_embd), np.float32), 0.0

    monkeypatch.setattr(model45.vision, "group_embeddings", fake_group)
    items, _ = model45.prepare(msgs, max_slice_nums=1, use_image_id=False, temporal_ids=GROUPS)
    ids, unk = published_layout_ids(folder, msgs, GROUPS, hf_tokenizer)
    assert [i if isinstance(i, int) else unk for i in items] == ids
    assert calls == [(3, GROUPS[0]), (3, GROUPS[1])]
    assert sum(1 for i in items if not isinstance(i, int)) == 2 * 64


def test_temporal_ids_refused_where_published_code_refuses(model45, converted) -> None:  # noqa: ANN001
    frames, msgs = frames_and_msgs()
    with pytest.raises(ChatInputError, match="6 images"):
        model45.chat(msgs=msgs, temporal_ids=[[0, 1]], sampling=False, max_new_tokens=1)
    with load(converted("minicpm-v-2.6", "q8_0").llm_path.parent, n_ctx=512) as older:
        with pytest.raises(ChatInputError, match="3D resampler"):
            older.chat(msgs=msgs, temporal_ids=GROUPS, sampling=False, max_new_tokens=1)


def test_greedy_answer_matches_torch_reference(model45, tiny_checkpoint, hf_tokenizer) -> None:  # noqa: ANN001
    import torch
    from reference import encode_video_reference, language_model
    from test_whole_model_parity import LOGIT_TOLERANCE, TIE, preprocess

    folder = tiny_checkpoint(FAMILY)
    preprocessor = json.loads((folder / "preprocessor_config.json").read_text())
    frames, msgs = frames_and_msgs()
    # the published call shape, as the model card makes it
    answer = model45.chat(msgs=msgs, use_image_id=False, max_slice_nums=1, temporal_ids=GROUPS, sampling=False,
                          max_new_tokens=16)
    assert isinstance(answer, str)

    ids, unk = published_layout_ids(folder, msgs, GROUPS, hf_tokenizer)
    piece_size = model45.vision.layout(frames[0].size, 1).overview
    pixels = [preprocess(f.resize(piece_size, 3), preprocessor) for f in frames]  # 3 = bicubic
    blocks = encode_video_reference(folder, [pixels[:3], pixels[3:]], GROUPS)
    llm = language_model(folder)
    with torch.no_grad():
        embeds = llm.get_input_embeddings()(torch.tensor([ids]))[0].clone()
        embeds[[i for i, t in enumerate(ids) if t == unk]] = blocks.reshape(-1, blocks.shape[-1]).to(embeds.dtype)
        reference_logits = llm(inputs_embeds=embeds[None]).logits[0].float().numpy()
    items, _ = model45.prepare(msgs, max_slice_nums=1, use_image_id=False, temporal_ids=GROUPS)
    ours = model45.prompt_logits(items)[:, : reference_logits.shape[1]]
    assert np.abs(ours - reference_logits).max() < LOGIT_TOLERANCE

    tokens = [r.token for r in model45.stream_generate(msgs, max_new_tokens=16, max_slice_nums=1,
                                                       use_image_id=False, temporal_ids=GROUPS)]
    with torch.no_grad():
        sequence = embeds
        for token in tokens:
            logits = llm(inputs_embeds=sequence[None]).logits[0, -1]
            assert float(logits[token]) >= float(logits.max()) - TIE
            sequence = torch.cat([sequence, llm.get_input_embeddings()(torch.tensor([token]))])


def test_video_part_samples_and_packs(model45, tmp_path: Path) -> None:  # noqa: ANN001
    clip = write_clip(tmp_path / "clip.mp4", 2.0, 10, size=(112, 84))
    items, _ = model45.prepare([{"role": "user", "content": [{"type": "video", "path": str(clip), "fps": 3,
                                                              "packing": 3}, QUESTION]}])
    # 2 s at 3 fps: 6 frames, packed by 3: two 64-row blocks
    assert sum(1 for i in items if not isinstance(i, int)) == 2 * 64
    with pytest.raises(VideoInputError, match="MiniCPM-V 4.6's video options"):
        model45.prepare([{"role": "user", "content": [Video(clip, stack_frames=2), QUESTION]}])


# ---- MiniCPM-V 4.6 through transformers' processor and model -----------------------------------------------

@pytest.fixture(scope="module")
def model46(converted):  # noqa: ANN001, ANN201
    model = load(converted("minicpm-v-4.6", "f32").llm_path.parent, n_ctx=2048)
    yield model
    model.close()


@pytest.mark.parametrize("stack", [1, 3])
def test_46_video_prompt_and_logits_equal_transformers(stack: int, model46, tiny_checkpoint,  # noqa: ANN001
                                                       tmp_path: Path) -> None:
    import torch
    import transformers
    from official import image_ids, published_processor_class, transformers_reference
    from transformers.models.minicpmv4_6.image_processing_pil_minicpmv4_6 import MiniCPMV4_6ImageProcessorPil
    from transformers.models.minicpmv4_6.processing_minicpmv4_6 import MiniCPMV4_6Processor
    from transformers.video_utils import VideoMetadata

    folder = tiny_checkpoint("minicpm-v-4.6")
    clip = write_clip(tmp_path / "clip.mp4", 3.0, 10, size=(160, 120))
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    processor = published_processor_class(MiniCPMV4_6Processor)(
        image_processor=MiniCPMV4_6ImageProcessorPil.from_pretrained(folder),
        video_processor=processor_46_video()(), tokenizer=tokenizer)
    with av.open(str(clip)) as container:
        decoded = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])
    metadata = VideoMetadata(total_num_frames=len(decoded), fps=10.0, duration=len(decoded) / 10.0)
    text = tokenizer.apply_chat_template([{"role": "user", "content": f"{tokenizer.video_token}\n{QUESTION}"}],
                                         tokenize=False, add_generation_prompt=True, enable_thinking=False)
    inputs = processor(text=[text], videos=[decoded], video_metadata=[metadata], max_slice_nums=1,
                       use_image_id=False, stack_frames=stack, return_tensors="pt")

    msgs = [{"role": "user", "content": [Video(clip, stack_frames=stack), QUESTION]}]
    items, _ = model46.prepare(msgs)
    assert image_ids(items, processor.video_token_id) == inputs["input_ids"][0].tolist()

    reference = transformers_reference(folder)
    with torch.no_grad():
        expected = reference(**inputs).logits[0].float().numpy()
    ours = model46.prompt_logits(items)[:, : expected.shape[1]]
    assert np.abs(ours - expected).max() < 0.01
    assert (ours.argmax(-1) == expected.argmax(-1)).all()


def test_46_refuses_temporal_options(model46, tmp_path: Path) -> None:  # noqa: ANN001
    clip = write_clip(tmp_path / "clip.mp4", 1.0, 10)
    with pytest.raises(VideoInputError, match="3D-resampler"):
        model46.prepare([{"role": "user", "content": [Video(clip, packing=3), QUESTION]}])
    with pytest.raises(ChatInputError, match="3D resampler"):
        model46.prepare([{"role": "user", "content": [random_image((64, 64)), QUESTION]}], temporal_ids=[[0]])
