"""Video inputs: frames decoded with PyAV (the optional `video` extra, imported only when a video is read) and
chosen as each family's published code chooses them.

- MiniCPM-V 4.5 / MiniCPM-o 4.5 (3D resampler): the model card's `encode_video(path, choose_fps, force_packing)`.
  A video of at most MAX_NUM_FRAMES frames at `fps` keeps `min(fps, round(video fps)) x duration` frames,
  one per group; a longer one packs ceil(duration x fps / MAX_NUM_FRAMES) frames per group (at most
  MAX_NUM_PACKING, else the frame count is capped at MAX_NUM_FRAMES x MAX_NUM_PACKING), frames taken from the
  middle of equal index intervals. A frame's temporal id is its timestamp snapped to a 0.1 s grid, in ticks;
  ids are grouped `packing` at a time, and each group becomes one 64-token block.
- MiniCPM-V 4.6 (transformers' `MiniCPMV4_6VideoProcessor.sample_frames` and `_preprocess`): one main frame per
  second (a video longer than max_num_frames seconds: 0.1 s steps thinned to max_num_frames), and with
  `stack_frames` > 1 the sub-second frames of each second composited into one grid image placed after that
  second's main frame.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

# The model card's constants (MiniCPM-V 4.5 "Chat with Video").
MAX_NUM_FRAMES = 180
MAX_NUM_PACKING = 3
PACKING_RANGE = (1, 6)  # "valid range: 1-6"
TIME_SCALE = 0.1
DEFAULT_FPS = 5  # the model card's example; its encode_video's own default is 3
# MiniCPMV4_6VideoProcessor's defaults.
MAX_NUM_FRAMES_46 = 128
STACK_LINE_WIDTH = 6
# Decoding is sequential, so a very long video costs minutes before the first token; refuse beyond an hour.
MAX_VIDEO_SECONDS = 3600.0


class VideoInputError(ValueError):
    """A video that cannot be read or sampled (also: the `video` extra is missing)."""


@dataclass(frozen=True)
class Video:
    """A video content part. `fps` and `packing` (frames per 3D-resampler group; None: as encode_video
    decides) apply to MiniCPM-V 4.5 / o-4.5, `stack_frames` and `max_num_frames` to MiniCPM-V 4.6; None
    means the published default. `{"type": "video", "path": ..., **these}` is the same part as a dict."""

    path: str | Path
    fps: float | None = None
    packing: int | None = None
    stack_frames: int | None = None
    max_num_frames: int | None = None

    @classmethod
    def from_part(cls, part: dict[str, Any]) -> "Video":
        options = {k: v for k, v in part.items() if k not in ("type", "path", "video")}
        unknown = sorted(set(options) - {"fps", "packing", "stack_frames", "max_num_frames"})
        if unknown:
            raise VideoInputError(f"a video part does not take {', '.join(unknown)}")
        path = part.get("path", part.get("video"))
        if not isinstance(path, (str, Path)):
            raise VideoInputError("a video part needs a 'path' (a file name)")
        return cls(Path(path), **options)


@dataclass(frozen=True)
class VideoInfo:
    frames: int  # decodable frames in the first video stream
    fps: float  # average frame rate

    @property
    def duration(self) -> float:
        return self.frames / self.fps


@dataclass(frozen=True)
class SampledVideo:
    """Frames in prompt order. `temporal_ids` (3D-resampler families): one list per group, one id per frame."""

    frames: list[Image.Image]
    temporal_ids: list[list[int]] | None
    info: VideoInfo


def _av() -> Any:
    try:
        import av
    except ImportError:
        raise VideoInputError("reading a video needs PyAV: pip install 'minicpmv-edge[video]'") from None
    return av


def _open(path: Path) -> Any:
    av = _av()
    if not path.is_file():
        raise VideoInputError(f"video not found: {path}")
    try:
        container = av.open(str(path))
    except (av.FFmpegError, OSError) as e:
        raise VideoInputError(f"not a video PyAV can read: {path} ({e})") from None
    if not container.streams.video:
        container.close()
        raise VideoInputError(f"{path} has no video stream (a zero-length video has none)")
    return container


def probe(path: str | Path) -> VideoInfo:
    """Frame count and average frame rate, as decord's len() and get_avg_fps() (and transformers' PyAV reader)
    report them; a container that does not store the count has its frames counted."""
    path = Path(path).expanduser()
    av = _av()
    container = _open(path)
    try:
        stream = container.streams.video[0]
        rate = float(stream.average_rate or 0)
        frames = int(stream.frames or 0)
        if frames <= 0:
            frames = sum(1 for _ in container.decode(video=0))
    except av.FFmpegError as e:
        raise VideoInputError(f"cannot decode {path}: {e}") from None
    finally:
        container.close()
    if frames <= 0 or rate <= 0:
        raise VideoInputError(f"{path} holds no frames (zero-length video)")
    info = VideoInfo(frames, rate)
    if info.duration > MAX_VIDEO_SECONDS:
        raise VideoInputError(f"{path} lasts {info.duration:,.0f} s; videos up to {MAX_VIDEO_SECONDS:,.0f} s are "
                              "read (cut it first)")
    return info


def read_frames(path: str | Path, indices: list[int]) -> list[Image.Image]:
    """The frames at `indices` (decode order; repeats allowed) as RGB images, decoding once from the start."""
    path = Path(path).expanduser()
    av = _av()
    wanted = set(indices)
    found: dict[int, Image.Image] = {}
    container = _open(path)
    try:
        for index, frame in enumerate(container.decode(video=0)):
            if index in wanted:
                found[index] = frame.to_image().convert("RGB")
            if len(found) == len(wanted):
                break
    except av.FFmpegError as e:
        raise VideoInputError(f"cannot decode {path}: {e}") from None
    finally:
        container.close()
    missing = sorted(wanted - set(found))
    if missing:
        raise VideoInputError(f"{path}: frame {missing[0]} could not be decoded ({len(found)} of {len(wanted)} read)")
    return [found[i] for i in indices]


# ---- MiniCPM-V 4.5 / o-4.5: the model card's encode_video ------------------------------------------------

def packing_plan(info: VideoInfo, choose_fps: float = DEFAULT_FPS, force_packing: int | None = None,
                 max_packing: int = MAX_NUM_PACKING) -> tuple[list[int], list[list[int]]]:
    """(frame indices, temporal ids grouped per 3D-resampler block), as encode_video computes them."""
    if not PACKING_RANGE[0] <= max_packing <= PACKING_RANGE[1]:
        raise VideoInputError(f"packing must be {PACKING_RANGE[0]}-{PACKING_RANGE[1]}, not {max_packing}")
    if choose_fps <= 0:
        raise VideoInputError(f"fps must be positive, not {choose_fps}")
    duration = info.duration
    if choose_fps * int(duration) <= MAX_NUM_FRAMES:
        packing = 1
        count = round(min(choose_fps, round(info.fps)) * min(MAX_NUM_FRAMES, duration))
    else:
        packing = math.ceil(duration * choose_fps / MAX_NUM_FRAMES)
        if packing <= max_packing:
            count = round(duration * choose_fps)
        else:
            count, packing = round(MAX_NUM_FRAMES * max_packing), max_packing
    if count < 1:
        raise VideoInputError(f"the video lasts {duration:.2f} s: too short for one frame at {choose_fps:g} fps")
    gap = info.frames / count
    indices = [int(i * gap + gap / 2) for i in range(count)]
    if force_packing:
        packing = min(force_packing, max_packing)
    scale = np.arange(0, duration, TIME_SCALE)
    stamps = np.asarray(indices) / info.fps
    nearest = scale[np.abs(stamps[:, None] - scale[None, :]).argmin(axis=1)]
    ids = (nearest / TIME_SCALE).astype(np.int32).tolist()
    return indices, [ids[i:i + packing] for i in range(0, len(ids), packing)]


# ---- MiniCPM-V 4.6: MiniCPMV4_6VideoProcessor ------------------------------------------------------------

def _thin(values: list, limit: int) -> list:
    if len(values) <= limit:
        return values
    return [values[i] for i in np.linspace(0, len(values) - 1, limit, dtype=int)]


def per_second_plan(info: VideoInfo, max_num_frames: int = MAX_NUM_FRAMES_46,
                    stack_frames: int = 1) -> tuple[list[int], list[list[int]]]:
    """(main frame indices, per second the indices of the sub-frames to stack: one list per main frame), as
    the processor's sample_frames and _preprocess pair them (transformers' PyAV metadata: duration =
    frames / average rate)."""
    if max_num_frames < 1 or stack_frames < 1:
        raise VideoInputError("max_num_frames and stack_frames must be at least 1")
    duration, seconds = info.duration, math.ceil(info.duration)
    if duration > max_num_frames:
        stamps = [round(i * 0.1, 1) for i in range(int(duration / 0.1))]
        main = _thin([min(int(t * info.fps), info.frames - 1) for t in stamps], max_num_frames)
    else:
        main = [int(i * info.fps) for i in range(seconds)]
    stacked: list[list[int]] = [[] for _ in main]
    if stack_frames > 1:
        subs = _thin([s + j / stack_frames for s in range(seconds) for j in range(1, stack_frames)
                      if s + j / stack_frames < duration], max_num_frames * (stack_frames - 1))
        for second in range(min(seconds, len(main))):
            stacked[second] = [min(int(t * info.fps), info.frames - 1) for t in subs if second <= t < second + 1]
    return main, stacked


def stack_composite(frames: list[Image.Image]) -> Image.Image:
    """Sub-frames side by side on a black canvas with 6-pixel gaps, as concat_frames_as_image arranges them
    (2x2 for four; for two or three the row/column choice nearest a square canvas; else one row)."""
    width, height = frames[0].size
    count = len(frames)

    def ratio(rows: int, cols: int) -> float:
        return (cols * width + (cols - 1) * STACK_LINE_WIDTH) / max(1, rows * height + (rows - 1) * STACK_LINE_WIDTH)

    if count == 4:
        rows, cols = 2, 2
    elif count in (2, 3):
        candidates = [(1, count), (count, 1)]
        errors = [abs(ratio(r, c) - 1.0) for r, c in candidates]
        if count == 2 and errors[0] == errors[1]:
            rows, cols = (1, 2) if width / height >= 1.0 else (2, 1)
        else:
            rows, cols = candidates[int(np.argmin(errors))]
    else:
        rows, cols = 1, count
    canvas = Image.new("RGB", (cols * width + (cols - 1) * STACK_LINE_WIDTH,
                               rows * height + (rows - 1) * STACK_LINE_WIDTH))
    for index, frame in enumerate(frames):
        row, col = divmod(index, cols)
        canvas.paste(frame, (col * (width + STACK_LINE_WIDTH), row * (height + STACK_LINE_WIDTH)))
    return canvas


def sample(video: Video, mode: str) -> SampledVideo:
    """The frames (and temporal groups) of `video` for a family whose video mode is `mode` (the registry's
    `Family.video`: "temporal" or "frames")."""
    info = probe(video.path)
    if mode == "temporal":
        if video.stack_frames is not None or video.max_num_frames is not None:
            raise VideoInputError("stack_frames and max_num_frames are MiniCPM-V 4.6's video options; "
                                  "this model packs frames with fps and packing")
        packing = video.packing
        if packing is not None and not PACKING_RANGE[0] <= packing <= PACKING_RANGE[1]:
            raise VideoInputError(f"packing must be {PACKING_RANGE[0]}-{PACKING_RANGE[1]}, not {packing}")
        indices, groups = packing_plan(info, DEFAULT_FPS if video.fps is None else video.fps, packing,
                                       max(MAX_NUM_PACKING, packing or 0))
        return SampledVideo(read_frames(video.path, indices), groups, info)
    if video.fps is not None or video.packing is not None:
        raise VideoInputError("fps and packing apply to the 3D-resampler models (MiniCPM-V 4.5, MiniCPM-o 4.5); "
                              "MiniCPM-V 4.6 samples one frame per second (stack_frames adds sub-second frames)")
    main, stacked = per_second_plan(info, video.max_num_frames or MAX_NUM_FRAMES_46, video.stack_frames or 1)
    order = main + [i for group in stacked for i in group]
    decoded = dict(zip(order, read_frames(video.path, order)))
    units: list[Image.Image] = []
    for index, subs in zip(main, stacked):
        units.append(decoded[index])
        if subs:
            units.append(stack_composite([decoded[i] for i in subs]))
    return SampledVideo(units, None, info)
