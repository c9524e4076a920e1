"""The official MiniCPM-V image layout (LLaVA-UHD slicing as the published image processors do it) and the
text that frames each piece in the prompt (each family's `PieceFrame`, in the family registry). Piece sides are multiples of the patch size (14), or
for MiniCPM-V 4.6 of the patch size times the merger's per-side merge factor (56 in 16x mode, 28 in 4x), as
its processor aligns them.

mtmd differs from the published processors in four ways that change what the model sees: it fixes
max_slice_nums at 9, stretches an image that fits one slice to a 448x448 square, slices images whose area
fits one slice but one side is longer than 448, and writes no <image_id> tags. The runtime therefore cuts
pieces itself (this module) and only asks llama.cpp's vision tower to encode them (`clip_encoder`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from PIL import Image

from minicpmv_edge.families import PieceFrame

SCALE_RESOLUTION = 448
PATCH_SIZE = 14
DEFAULT_MAX_SLICE_NUMS = 9


def ensure_divide(length: float, divisor: int) -> int:
    return max(round(length / divisor) * divisor, divisor)


def find_best_resize(size: tuple[float, float], scale_resolution: int = SCALE_RESOLUTION,
                     patch_size: int = PATCH_SIZE, allow_upscale: bool = False) -> tuple[int, int]:
    """(width, height) with about scale_resolution^2 pixels, the aspect ratio kept, sides multiples of patch_size."""
    width, height = size
    if width * height > scale_resolution * scale_resolution or allow_upscale:
        ratio = width / height
        height = int(scale_resolution / math.sqrt(ratio))
        width = int(height * ratio)
    return ensure_divide(width, patch_size), ensure_divide(height, patch_size)


def sliced_grid(size: tuple[int, int], max_slice_nums: int,
                scale_resolution: int = SCALE_RESOLUTION) -> tuple[int, int] | None:
    """(columns, rows) of slices, or None when the image is kept whole."""
    width, height = size
    log_ratio = math.log(width / height)
    multiple = min(math.ceil(width * height / (scale_resolution * scale_resolution)), max_slice_nums)
    if multiple <= 1:
        return None
    best, best_error = None, math.inf
    for count in (multiple - 1, multiple, multiple + 1):
        if count == 1 or count > max_slice_nums:
            continue
        for columns in range(1, count + 1):
            if count % columns:
                continue
            error = abs(log_ratio - math.log(columns / (count // columns)))
            if error < best_error:
                best, best_error = (columns, count // columns), error
    return best


def refine_size(size: tuple[int, int], grid: tuple[int, int], scale_resolution: int = SCALE_RESOLUTION,
                patch_size: int = PATCH_SIZE) -> tuple[int, int]:
    columns, rows = grid
    cell = (ensure_divide(size[0], columns) / columns, ensure_divide(size[1], rows) / rows)
    cell_w, cell_h = find_best_resize(cell, scale_resolution, patch_size, allow_upscale=True)
    return cell_w * columns, cell_h * rows


@dataclass(frozen=True)
class SliceLayout:
    overview: tuple[int, int]  # (width, height) of the whole-image piece
    grid: tuple[int, int] | None = None  # (columns, rows) of slices
    refined: tuple[int, int] | None = None  # size the image is resized to before it is cut

    @property
    def slice_size(self) -> tuple[int, int] | None:
        if self.grid is None or self.refined is None:
            return None
        return self.refined[0] // self.grid[0], self.refined[1] // self.grid[1]


class UnsupportedUpsize(ValueError):
    """A `small_image_upsize` mode this runtime cannot lay out."""


def plan_slices(size: tuple[int, int], max_slice_nums: int = DEFAULT_MAX_SLICE_NUMS,
                align: int = PATCH_SIZE, small_image_upsize: str = "always") -> SliceLayout:
    """The pieces of an image of `size`. `small_image_upsize` (MiniCPM-OCR's processor option; every other
    family's processor does "always") says how an image that is not sliced is sized: "always" scales it to
    about 448^2 pixels, "never" keeps its native size, both aligned to `align` (an image larger than 448^2
    shrinks either way)."""
    if small_image_upsize not in ("always", "never"):
        raise UnsupportedUpsize(f"small_image_upsize {small_image_upsize!r} is not supported by this runtime "
                                "(it lays out 'always' and 'never')")
    grid = sliced_grid(size, max_slice_nums)
    if grid is None:
        return SliceLayout(find_best_resize(size, patch_size=align, allow_upscale=small_image_upsize == "always"))
    return SliceLayout(find_best_resize(size, patch_size=align), grid, refine_size(size, grid, patch_size=align))


def cut(image: Image.Image, layout: SliceLayout) -> list[Image.Image]:
    """The overview, then the slices row by row, each resized with bicubic as the published processor does."""
    pieces = [image.resize(layout.overview, Image.Resampling.BICUBIC)]
    if layout.grid is not None and layout.refined is not None and layout.slice_size is not None:
        refined = image.resize(layout.refined, Image.Resampling.BICUBIC)
        width, height = layout.slice_size
        for top in range(0, layout.refined[1], height):
            for left in range(0, layout.refined[0], width):
                pieces.append(refined.crop((left, top, left + width, top + height)))
    return pieces


def layout_parts(layout: SliceLayout, frame: PieceFrame, image_id: int | None) -> list[str | int]:
    """The prompt pieces for one image: strings and piece indices (0 = overview, 1.. = slices)."""
    parts: list[str | int] = []
    if image_id is not None:
        parts.append(f"<image_id>{image_id}</image_id>")
    parts += [frame.overview[0], 0, frame.overview[1]]
    if layout.grid is None:
        return parts
    columns, rows = layout.grid
    parts.append(frame.slices[0])
    for row in range(rows):
        if row:
            parts.append(frame.row_separator)
        for column in range(columns):
            parts += [frame.piece[0], 1 + row * columns + column, frame.piece[1]]
    parts.append(frame.slices[1])
    return [p for p in parts if p != ""]
