"""Image inputs as users give them (PIL images, paths, bytes), made safe and uniform: EXIF orientation
applied, every mode converted to 8-bit RGB, decompression bombs refused."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

ImageInput = Union[Image.Image, str, Path, bytes]
# Pillow warns above ~89 MP and errors at twice that; a scanned A4 page at 600 dpi is ~35 MP.
MAX_PIXELS = 64_000_000


class ImageInputError(ValueError):
    """An input that is not a usable image."""


def _open(source: ImageInput) -> Image.Image:
    if isinstance(source, Image.Image):
        return source
    try:
        if isinstance(source, bytes):
            return Image.open(io.BytesIO(source))
        path = Path(source).expanduser()
        if not path.is_file():
            raise ImageInputError(f"image not found: {path}")
        return Image.open(path)
    except UnidentifiedImageError:
        name = "the given bytes" if isinstance(source, bytes) else str(source)
        raise ImageInputError(f"not an image Pillow can read: {name}") from None
    except Image.DecompressionBombError as e:
        raise ImageInputError(f"refusing a decompression bomb: {e}") from None


def to_rgb(image: Image.Image) -> Image.Image:
    if image.width * image.height > MAX_PIXELS:
        raise ImageInputError(f"image of {image.width}x{image.height} pixels exceeds the {MAX_PIXELS:,} pixel limit")
    try:
        image = ImageOps.exif_transpose(image)
        if image.mode.startswith("I"):
            # 16/32-bit integer grayscale: Pillow's convert("RGB") would clip, so scale 16-bit ranges down.
            data = np.asarray(image, dtype=np.float64)
            scale = 255.0 / 65535.0 if data.max() > 255 else 1.0
            image = Image.fromarray(np.clip(data * scale, 0, 255).astype(np.uint8))
        if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
            rgba = image.convert("RGBA")
            background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            image = Image.alpha_composite(background, rgba)
        return image.convert("RGB")
    except (OSError, ValueError) as e:
        raise ImageInputError(f"cannot decode the image: {e}") from None


def load_image(source: ImageInput) -> Image.Image:
    return to_rgb(_open(source))


def image_digest(image: Image.Image) -> str:
    return hashlib.sha256(image.tobytes() + f"{image.size}".encode()).hexdigest()[:32]
