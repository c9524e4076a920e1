"""Messages -> prompt items, laid out as the family's official processor does: the model's own chat
template (stored in the GGUF) renders the conversation; each image becomes `<image_id>N</image_id>` (where
the family uses image ids), the overview and the slices in the family's frame; each piece contributes one
item per row of its embeddings. Videos (`video.py` samples them) and frames grouped by `temporal_ids` are laid
out as the family's published video code does (`Family.video`): one 3D-resampler block per group at its first
frame, or (MiniCPM-V 4.6) each frame its own piece."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence, Union

import jinja2.sandbox
import numpy as np
from PIL import Image

from .images import image_digest, load_image
from .pair import PromptSettings
from .slicing import SliceLayout, UnsupportedUpsize, cut, layout_parts
from .video import Video, sample
from .vision_pipeline import VisionPipeline

# Stands for an image while the chat template renders; no tokenizer or user text produces it.
IMAGE_SENTINEL = "\x00minicpmv-edge-image\x00"
# An image piece's embeddings are keyed by (image digest, layout, piece index), the layout being max_slice_nums
# (or "<max_slice_nums>/<small_image_upsize>" where that mode is not "always"); a prompt item is a token id, or
# (piece key, row) for one position filled by a row of that piece's embeddings.
PieceKey = tuple[str, Union[int, str], int]
PromptItem = Union[int, tuple[PieceKey, int]]


class ChatInputError(ValueError):
    """Messages or chat() arguments that do not make a prompt."""


def _content_parts(content: Any) -> list[Any]:
    if isinstance(content, (list, tuple)):
        return list(content)
    return [content]


class PromptBuilder:
    def __init__(self, template: str, bos: str, settings: PromptSettings, tokenize: Callable[[str], list[int]]):
        env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        self.template = env.from_string(template)
        self.bos, self.settings, self.tokenize = bos, settings, tokenize
        # (width, height) of each image piece of the last prompt built (MiniCPM-V 4.7's canvas positions
        # follow the pieces' token grids).
        self.piece_sizes: dict[PieceKey, tuple[int, int]] = {}

    def render(self, msgs: Sequence[dict[str, Any]], system_prompt: str | None = None,
               enable_thinking: bool = False,
               temporal_ids: Sequence[Sequence[int]] | None = None) -> tuple[list[str], list[Visual]]:
        """The chat template applied; returns the text split around images and videos, and what stands at
        each split in order. As the published chat() does, a message's parts are joined with newlines and each
        image stands where the user put it; a video part becomes its frames as the family's published code
        lays them out (3D-resampler families: one image per frame, as the model card's `frames + [question]`;
        MiniCPM-V 4.6: one video). `temporal_ids` (the published chat() argument) groups the conversation's
        images, in order, into 3D-resampler blocks."""
        visuals: list[Visual] = []
        messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
        if not msgs:
            raise ChatInputError("msgs is empty: give at least one user message")
        for number, msg in enumerate(msgs, 1):
            if not isinstance(msg, dict):
                raise ChatInputError(f"message {number} is a {type(msg).__name__}, not a dict with role and content")
            role, content = msg.get("role"), msg.get("content")
            if role not in ("user", "assistant", "system"):
                raise ChatInputError(f"message {number}: role must be user, assistant or system, not {role!r}")
            texts = []
            for part in _content_parts(content):
                if isinstance(part, str):
                    texts.append(part)
                elif isinstance(part, (Image.Image, bytes, Path)):
                    visuals.append(Visual((load_image(part),)))
                    texts.append(IMAGE_SENTINEL)
                elif isinstance(part, Video) or (isinstance(part, dict) and part.get("type") == "video"):
                    video = self._video(part)
                    texts.extend([IMAGE_SENTINEL] * self._add_video(video, visuals))
                else:
                    raise ChatInputError(f"message {number} ({role}): a content part of type {type(part).__name__} "
                                         "is neither text, an image nor a video")
            messages.append({"role": role, "content": "\n".join(texts)})
        if temporal_ids is not None:
            visuals = self._grouped(visuals, temporal_ids)
        text = self.template.render(messages=messages, add_generation_prompt=True, bos_token=self.bos,
                                    enable_thinking=enable_thinking)
        return text.split(IMAGE_SENTINEL), visuals

    def _video(self, part: Video | dict[str, Any]) -> Video:
        family = self.settings.family
        if not family.video:
            raise ChatInputError(f"{family.title} has no published video path (video: MiniCPM-V 4.5, MiniCPM-o 4.5, "
                                 "MiniCPM-V 4.6); give chosen frames as images")
        return part if isinstance(part, Video) else Video.from_part(part)

    def _add_video(self, video: Video, visuals: list[Visual]) -> int:
        """Append the video's visuals; returns how many sentinels the text gets for it."""
        sampled = sample(video, self.settings.family.video)
        if sampled.temporal_ids is None:
            visuals.append(Visual(tuple(sampled.frames), video=True))
            return 1
        group = 1 + max((v.group for v in visuals if v.group is not None), default=-1)
        frames = iter(sampled.frames)
        for offset, ids in enumerate(sampled.temporal_ids):
            visuals.extend(Visual((next(frames),), group + offset, temporal_id, video=True) for temporal_id in ids)
        return len(sampled.frames)

    def _grouped(self, visuals: list[Visual], temporal_ids: Sequence[Sequence[int]]) -> list[Visual]:
        family = self.settings.family
        if family.video != "temporal":
            raise ChatInputError(f"chat(temporal_ids=...) needs a 3D resampler (MiniCPM-V 4.5, MiniCPM-o 4.5); "
                                 f"{family.title} has none")
        if any(v.video for v in visuals):
            raise ChatInputError("temporal_ids group the images of msgs; give frames as images, or a video part "
                                 "without temporal_ids")
        try:
            groups = [[int(t) for t in group] for group in temporal_ids]
        except (TypeError, ValueError):
            raise ChatInputError("temporal_ids must be a list of lists of ints (one list per group of frames)") from None
        if any(not group for group in groups) or any(t < -1 for group in groups for t in group):
            raise ChatInputError("temporal_ids: every group needs at least one id, and ids are >= -1")
        if sum(map(len, groups)) != len(visuals):
            raise ChatInputError(f"temporal_ids hold {sum(map(len, groups))} ids for {len(visuals)} images in msgs")
        flat = [(number, t) for number, group in enumerate(groups) for t in group]
        return [Visual(v.images, number, t) for v, (number, t) in zip(visuals, flat)]

    def build(self, msgs: Sequence[dict[str, Any]], vision: VisionPipeline, *, system_prompt: str | None = None,
              enable_thinking: bool = False, max_slice_nums: int | None = None,
              use_image_id: bool | None = None, small_image_upsize: str | None = None,
              temporal_ids: Sequence[Sequence[int]] | None = None) -> tuple[list[PromptItem], float]:
        """The prompt items of `msgs`, and the seconds spent encoding pieces no cache held."""
        texts, visuals = self.render(msgs, system_prompt, enable_thinking, temporal_ids)
        slices = self.settings.max_slice_nums if max_slice_nums is None else int(max_slice_nums)
        if slices < 1:
            raise ChatInputError(f"max_slice_nums must be at least 1, not {slices}")
        family = self.settings.family
        upsize = self.settings.small_image_upsize if small_image_upsize is None else small_image_upsize
        if upsize not in family.small_image_upsize:
            raise ChatInputError(f"small_image_upsize {upsize!r} is none of {family.title}'s modes "
                                 f"({', '.join(family.small_image_upsize)})")
        with_ids = self.settings.use_image_id if use_image_id is None else use_image_id
        members: dict[int, list[int]] = {}
        for index, visual in enumerate(visuals):
            if visual.group is not None:
                members.setdefault(visual.group, []).append(index)
        placer = _Placer(self, vision)
        self.piece_sizes = {}
        image_number = 0  # image ids count images (and 3D-resampler frames), not 4.6 videos
        for index, text in enumerate(texts):
            visual = visuals[index] if index < len(visuals) else None
            # The published processor drops a group's later frames and strips the text before each of them.
            skipped = visual is not None and visual.group is not None and members[visual.group][0] != index
            placer.items.extend(self.tokenize(text.strip() if skipped else text))
            if visual is None:
                break
            image_id = image_number if with_ids and not visual.video else None
            image_number += visual.group is not None or not visual.video
            if skipped:
                continue
            if visual.group is not None:
                frames = [visuals[i] for i in members[visual.group]]
                placer.group([f.images[0] for f in frames], [f.temporal_id for f in frames],
                             VIDEO_MAX_SLICE_NUMS if visual.video else slices, image_id)
            elif not visual.video:
                placer.image(visual.images[0], slices, upsize, image_id)
            else:  # a MiniCPM-V 4.6 video: its frames' placeholders back to back, as its video processor writes
                for frame in visual.images:
                    placer.image(frame, VIDEO_MAX_SLICE_NUMS, "always", None)
        vision.keep_only(placer.used)
        return placer.items, placer.encode_s


# The published video usage (the 4.5 model card's chat(..., use_image_id=False, max_slice_nums=1); mlx-vlm's
# 4.6 notes the same): a video part's frames are not sliced and carry no image ids. Frames given as images
# with temporal_ids follow chat()'s max_slice_nums / use_image_id, as published.
VIDEO_MAX_SLICE_NUMS = 1


@dataclass(frozen=True)
class Visual:
    """What stands at one sentinel of the rendered text: an image; one frame of a 3D-resampler group (`group`,
    and its `temporal_id` in 0.1 s ticks); or a MiniCPM-V 4.6 video's frames. `video`: from a video part."""

    images: tuple[Image.Image, ...]
    group: int | None = None
    temporal_id: int = -1
    video: bool = False


class _Placer:
    """Accumulates one prompt's items: each image's layout parts as text tokens and embedding rows."""

    def __init__(self, builder: PromptBuilder, vision: VisionPipeline):
        self.builder, self.vision = builder, vision
        self.items: list[PromptItem] = []
        self.used: list[PieceKey] = []
        self.encode_s = 0.0

    def _layout(self, image: Image.Image, slices: int, upsize: str) -> SliceLayout:
        try:
            return self.vision.layout(image.size, slices, upsize, image=image)
        except UnsupportedUpsize as e:
            raise ChatInputError(str(e)) from None

    def _place(self, layout: SliceLayout, image_id: int | None,
               embed: Callable[[int], tuple[PieceKey, tuple[np.ndarray, float]]]) -> None:
        for part in layout_parts(layout, self.builder.settings.family.frame, image_id):
            if isinstance(part, str):
                self.items.extend(self.builder.tokenize(part))
                continue
            key, (embeddings, seconds) = embed(part)
            self.builder.piece_sizes[key] = layout.overview if part == 0 else layout.slice_sizes[part - 1]
            self.encode_s += seconds
            self.used.append(key)
            self.items.extend((key, row) for row in range(embeddings.shape[0]))

    def image(self, image: Image.Image, slices: int, upsize: str, image_id: int | None) -> None:
        layout = self._layout(image, slices, upsize)
        layout_key: int | str = slices if upsize == "always" else f"{slices}/{upsize}"
        digest = image_digest(image)
        pieces: list[Image.Image] = []

        def embed(part: int) -> tuple[PieceKey, tuple[np.ndarray, float]]:
            def piece() -> Image.Image:
                if not pieces:
                    pieces.extend(cut(image, layout))
                return pieces[part]

            key = (digest, layout_key, part)
            return key, self.vision.embeddings(key, piece)

        self._place(layout, image_id, embed)

    def group(self, frames: list[Image.Image], temporal_ids: list[int], slices: int, image_id: int | None) -> None:
        """One 3D-resampler block per piece of the first frame's layout (the frames' same pieces together)."""
        if len({frame.size for frame in frames}) > 1:
            raise ChatInputError(f"the frames of one temporal group differ in size "
                                 f"({', '.join(sorted({f'{w}x{h}' for w, h in (f.size for f in frames)}))})")
        layout = self._layout(frames[0], slices, "always")
        digest = hashlib.sha256(("|".join(map(image_digest, frames)) + f"{temporal_ids}").encode()).hexdigest()[:32]
        cuts: list[list[Image.Image]] = []

        def embed(part: int) -> tuple[PieceKey, tuple[np.ndarray, float]]:
            def pieces() -> list[Image.Image]:
                if not cuts:
                    cuts.extend(cut(frame, layout) for frame in frames)
                return [frame_pieces[part] for frame_pieces in cuts]

            key = (f"group:{digest}", slices, part)
            return key, self.vision.group_embeddings(key, pieces, temporal_ids)

        self._place(layout, image_id, embed)
