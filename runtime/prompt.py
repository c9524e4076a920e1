"""Messages -> prompt items, laid out as the family's official processor does: the model's own chat
template (stored in the GGUF) renders the conversation; each image becomes `<image_id>N</image_id>` (where
the family uses image ids), the overview and the slices in the family's frame; each piece contributes one
item per row of its embeddings."""

from __future__ import annotations

from typing import Any, Callable, Sequence, Union

import jinja2.sandbox
from PIL import Image
from pathlib import Path

from .images import image_digest, load_image
from .pair import PromptSettings
from .slicing import UnsupportedUpsize, cut, layout_parts
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

    def render(self, msgs: Sequence[dict[str, Any]], system_prompt: str | None = None,
               enable_thinking: bool = False) -> tuple[list[str], list[Image.Image]]:
        """The chat template applied; returns the text split around images, and the images in order.
        As the published chat() does, a message's parts are joined with newlines and each image stands
        where the user put it."""
        images: list[Image.Image] = []
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
                    images.append(load_image(part))
                    texts.append(IMAGE_SENTINEL)
                else:
                    raise ChatInputError(f"message {number} ({role}): a content part of type {type(part).__name__} "
                                         "is neither text nor an image")
            messages.append({"role": role, "content": "\n".join(texts)})
        text = self.template.render(messages=messages, add_generation_prompt=True, bos_token=self.bos,
                                    enable_thinking=enable_thinking)
        return text.split(IMAGE_SENTINEL), images

    def build(self, msgs: Sequence[dict[str, Any]], vision: VisionPipeline, *, system_prompt: str | None = None,
              enable_thinking: bool = False, max_slice_nums: int | None = None,
              use_image_id: bool | None = None,
              small_image_upsize: str | None = None) -> tuple[list[PromptItem], float]:
        """The prompt items of `msgs`, and the seconds spent encoding pieces no cache held."""
        texts, images = self.render(msgs, system_prompt, enable_thinking)
        slices = self.settings.max_slice_nums if max_slice_nums is None else int(max_slice_nums)
        if slices < 1:
            raise ChatInputError(f"max_slice_nums must be at least 1, not {slices}")
        family = self.settings.family
        upsize = self.settings.small_image_upsize if small_image_upsize is None else small_image_upsize
        if upsize not in family.small_image_upsize:
            raise ChatInputError(f"small_image_upsize {upsize!r} is none of {family.title}'s modes "
                                 f"({', '.join(family.small_image_upsize)})")
        layout_key: int | str = slices if upsize == "always" else f"{slices}/{upsize}"
        with_ids = self.settings.use_image_id if use_image_id is None else use_image_id
        encode_s = 0.0
        items: list[PromptItem] = []
        used: list[PieceKey] = []
        for index, text in enumerate(texts):
            items.extend(self.tokenize(text))
            if index == len(images):
                break
            image = images[index]
            try:
                layout = vision.layout(image.size, slices, upsize, image=image)
            except UnsupportedUpsize as e:
                raise ChatInputError(str(e)) from None
            digest = image_digest(image)
            pieces: list[Image.Image] = []
            for part in layout_parts(layout, family.frame, index if with_ids else None):
                if isinstance(part, str):
                    items.extend(self.tokenize(part))
                    continue
                key = (digest, layout_key, part)

                def piece(part: int = part) -> Image.Image:
                    if not pieces:
                        pieces.extend(cut(image, layout))
                    return pieces[part]

                embeddings, seconds = vision.embeddings(key, piece)
                encode_s += seconds
                used.append(key)
                items.extend((key, row) for row in range(embeddings.shape[0]))
        vision.keep_only(used)
        return items, encode_s
