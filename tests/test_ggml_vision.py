"""Our ggml graph of MiniCPM-V's vision tower and 3D resampler (runtime/video_encoder.py) against the torch
reference written from the published resampler.py, and against clip.cpp's own encoding of a still image.

Tolerances: cosine >= 0.999 per output token against the fp32 reference (the mmproj is F16, the attention
F16 K/V with F32 accumulation, as clip.cpp); a still image within cosine 0.99999 and 3e-3 absolute of
clip.cpp's embeddings (same ops, same weights; only the sin-cos tables are computed elsewhere, and float32
differences that flip a key's F16 rounding are amplified by the sharpened attention: 6e-4 seen)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from minicpmv_edge.convert import convert_checkpoint
from minicpmv_edge.families import get as family_entry
from minicpmv_edge.runtime import VisionError, load
from minicpmv_edge.runtime import video_encoder
from minicpmv_edge.runtime.video_encoder import VideoEncoder, published_buckets
from reference import encode_video_reference, published_position_ids
from test_model_parity import cosine_rows

# The 4.5 families (one mmproj graph), and those whose published resampler takes temporal ids: MiniCPM-o 4.5's
# published Resampler.forward (OpenBMB/MiniCPM-o-Demo MiniCPMO45/modeling_minicpmo.py) has none, its reference
# is the 2-D one, so it is checked as a still image only.
FAMILIES_45 = ["minicpm-v-4.5", "minicpm-o-4.5"]
TEMPORAL = [key for key in FAMILIES_45 if family_entry(key).reference.resampler == "3d"]
MEAN = STD = 0.5  # the tiny checkpoints' (and the published) processor normalisation
# 2 groups of 3 frames, temporal ids in 0.1 s ticks as the model card's encode_video makes them at 5 fps
TEMPORAL_IDS = [[0, 2, 4], [6, 8, 10]]
SHARPEN = 8.0


def frames(count: int, size: tuple[int, int], seed: int) -> list[Image.Image]:
    """Frames of one moving scene (random pixels shifted 7 px a frame, plus noise): neighbours are alike."""
    width, height = size
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (height, width, 3)).astype(np.int16)
    return [Image.fromarray(np.clip(np.roll(base, 7 * i, axis=1) + rng.integers(-20, 20, base.shape), 0, 255)
                            .astype(np.uint8)) for i in range(count)]


def pixels(image: Image.Image) -> torch.Tensor:
    x = (np.asarray(image, dtype=np.float32) / np.float32(255) - MEAN) / STD
    return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))


@pytest.fixture(scope="module", params=FAMILIES_45)
def video_family(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(scope="module")
def sharp_checkpoint(video_family: str, tiny_checkpoint, workdir: Path) -> Path:  # noqa: ANN001
    """The tiny checkpoint with the resampler's query and key projections x SHARPEN. Random N(0, 0.02) weights
    give attention logits ~0.1, a near-uniform softmax over which the keys' position terms hardly matter (a
    test could not tell a missing temporal embedding); trained models attend sharply, as this copy does."""
    folder = workdir / "sharp" / video_family
    if not folder.exists():
        shutil.copytree(tiny_checkpoint(video_family), folder)
        name = "resampler.attn.in_proj_weight"
        shard = folder / json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"][name]
        tensors = load_file(shard)
        width = tensors[name].shape[1]
        tensors[name][: 2 * width] *= SHARPEN  # rows: q, k, v
        save_file(tensors, shard, metadata={"format": "pt"})
    return folder


@pytest.fixture(scope="module")
def sharp_pair(video_family: str, sharp_checkpoint: Path, workdir: Path) -> Path:
    out = workdir / "sharp-gguf" / video_family
    if not out.exists():
        convert_checkpoint(sharp_checkpoint, out, "q8_0")
    return out


@pytest.fixture(scope="module")
def encoder(sharp_pair: Path):  # noqa: ANN201
    [mmproj] = sharp_pair.glob("mmproj*.gguf")
    with VideoEncoder(mmproj, n_threads=2) as opened:
        yield opened


@pytest.fixture(scope="module")
def video(sharp_checkpoint: Path) -> tuple[list[list[Image.Image]], np.ndarray]:
    """Two groups of three 252x182 frames (an 18 x 13 patch grid, not square) and the reference's embeddings."""
    groups = [frames(3, (252, 182), seed) for seed in (1, 2)]
    ref = encode_video_reference(sharp_checkpoint, [[pixels(f) for f in g] for g in groups], TEMPORAL_IDS)
    return groups, ref.float().numpy()


def test_position_buckets_are_the_published_ones() -> None:
    """The ViT's position ids repeat the published float32 bucketize, including the patch counts where
    floor(70 * i / n) (clip.cpp) differs from it (e.g. 25, 49, 50)."""
    for count in range(1, 1101):
        assert np.array_equal(published_buckets(count, 70), published_position_ids(count, 1, 70).numpy() // 70), count


@pytest.mark.parametrize("video_family", TEMPORAL, indirect=True)
def test_groups_match_the_published_3d_resampler(encoder: VideoEncoder, video) -> None:  # noqa: ANN001
    groups, ref = video
    for group, ids, expected in zip(groups, TEMPORAL_IDS, ref):
        ours = encoder.encode_group(group, ids)
        assert ours.shape == expected.shape == (encoder.query_num, encoder.n_embd)
        assert cosine_rows(ours, expected).min() >= 0.999


@pytest.mark.parametrize("video_family", TEMPORAL, indirect=True)
def test_a_mutant_without_the_temporal_embedding_fails(encoder: VideoEncoder, video, monkeypatch) -> None:  # noqa: ANN001
    """The comparison above can fail: the same graph with the temporal embedding dropped misses the reference."""
    groups, ref = video
    monkeypatch.setattr(video_encoder, "temporal_embedding", lambda dim, _id: np.zeros(dim, dtype=np.float32))
    mutant = encoder.encode_group(groups[1], TEMPORAL_IDS[1])
    assert cosine_rows(mutant, ref[1]).min() < 0.999


def test_a_still_image_equals_clip_cpp(encoder: VideoEncoder, sharp_pair: Path) -> None:
    """One frame with temporal id -1 is clip.cpp's still-image encode of the same piece (448x336: a 32 x 24
    grid, where clip.cpp's position buckets agree with the published ones)."""
    [piece] = frames(1, (448, 336), seed=3)
    with load(sharp_pair, n_ctx=512) as model:
        clip = model.vision.encoder.encode(piece)
    ours = encoder.encode_group([piece], [-1])
    assert cosine_rows(ours, clip).min() >= 0.99999
    assert np.abs(ours - clip).max() < 3e-3


@pytest.mark.parametrize("frames_in, ids, needle", [
    ([], [], "at least one frame"),
    ([np.zeros((28, 28, 3), np.uint8)], [0, 1], "1 frames but 2 temporal ids"),
    ([np.zeros((28, 28, 3), np.uint8), np.zeros((28, 42, 3), np.uint8)], [0, 1], "must share a size"),
    ([np.zeros((28, 30, 3), np.uint8)], [0], "not a multiple of the 14-pixel patch"),
    ([np.zeros((28, 28), np.uint8)], [0], "RGB uint8"),
    ([np.zeros((28, 28, 3), np.uint8)], [-2], "temporal ids are ticks"),
])
def test_bad_groups_are_refused_before_ggml(encoder: VideoEncoder, frames_in: list, ids: list, needle: str) -> None:
    with pytest.raises(VisionError, match=needle):
        encoder.encode_group(frames_in, ids)


def test_an_mmproj_of_another_projector_is_refused(converted) -> None:  # noqa: ANN001
    with pytest.raises(VisionError, match="not a MiniCPM-V resampler mmproj"):
        VideoEncoder(converted("minicpm-v-4.6", "q8_0").mmproj_path, n_threads=1)


def test_a_missing_file_is_one_error(tmp_path: Path) -> None:
    with pytest.raises(VisionError, match="not a readable GGUF"):
        VideoEncoder(tmp_path / "nope.gguf", n_threads=1)

