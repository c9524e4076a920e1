"""The official MiniCPM-V image layout (LLaVA-UHD slicing as the published image processors do it) and the
text that frames each piece in the prompt (each family's `PieceFrame`, in the family registry). Piece sides are multiples of the patch size (14), or
for MiniCPM-V 4.6 of the patch size times the merger's per-side merge factor (56 in 16x mode, 28 in 4x), as
its processor aligns them.

mtmd differs from the published processors in four ways that change what the model sees: it fixes
max_slice_nums at 9, stretches an image that fits one slice to a 448x448 square, slices images whose area
fits one slice but one side is longer than 448, and writes no <image_id> tags. The runtime therefore cuts
pieces itself (this module) and only asks llama.cpp's vision tower to encode them (`clip_encoder`).

MiniCPM-OCR's `small_image_upsize="adaptive"` lays out from the image's content, as its
`MiniCPMOcrImageProcessor` does (OpenCV's Otsu threshold and 8-connected components, imported only then): an
unsliced image goes to about 448^2 for small dense text, towards 84^2 when tiny, else keeps its native size;
each slice whose cell of the original image (rounded boundaries) is at most 448^2 may be re-cut from the
original at such a size when that is smaller than the refined image's cell (`Recut`), so slices may differ
in size (the prompt takes each piece's row count from its embeddings).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from minicpmv_edge.families import PieceFrame
from minicpmv_edge.families.registry import UPSIZE_MODES

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
class Recut:
    """A slice MiniCPM-OCR's "adaptive" mode takes from the original image instead of the refined one: the cell
    `box` (left, top, right, bottom) of the original, resized to `size` (or kept as it is when that is its size)."""
    box: tuple[int, int, int, int]
    size: tuple[int, int]


@dataclass(frozen=True)
class SliceLayout:
    overview: tuple[int, int]  # (width, height) of the whole-image piece
    grid: tuple[int, int] | None = None  # (columns, rows) of slices
    refined: tuple[int, int] | None = None  # size the image is resized to before it is cut
    # "adaptive" only: per slice, row by row, None for the refined image's cell or the slice re-cut from the
    # original image; empty (every slice a cell of the refined image) in the other modes.
    recut: tuple[Recut | None, ...] = ()

    @property
    def slice_size(self) -> tuple[int, int] | None:
        """The size of a cell of the refined image (every slice's size unless `recut` says otherwise)."""
        if self.grid is None or self.refined is None:
            return None
        return self.refined[0] // self.grid[0], self.refined[1] // self.grid[1]

    @property
    def slice_sizes(self) -> list[tuple[int, int]]:
        """The (width, height) of each slice, row by row."""
        base = self.slice_size
        if base is None or self.grid is None:
            return []
        count = self.grid[0] * self.grid[1]
        recut = self.recut or (None,) * count
        return [base if r is None else r.size for r in recut]


class UnsupportedUpsize(ValueError):
    """A `small_image_upsize` mode this runtime cannot lay out."""


class MissingOpenCV(UnsupportedUpsize):
    """"adaptive" needs OpenCV (the optional extra `ocr`), which is not installed."""


MISSING_OPENCV = "small_image_upsize 'adaptive' needs OpenCV: pip install 'minicpmv-edge[ocr]'"

# MiniCPMOcrImageProcessor's calibration of the glyph classifier (`adaptive_upsize_resolution`).
SMALL_FONT_PX = 12.0
DENSE_GLYPHS_PER_KPX = 2.0
TINY_PIXELS = 6272
TINY_RESOLUTION = 84


def _cv2() -> Any:
    try:
        import cv2
    except ImportError:
        raise MissingOpenCV(MISSING_OPENCV) from None
    return cv2


def luma(image: Image.Image) -> np.ndarray:
    """ITU-R 601-2 luma of an RGB image with PIL's integer arithmetic, as the published processor computes it."""
    rgb = np.asarray(image.convert("RGB"), dtype=np.int32)
    return ((rgb[..., 0] * 19595 + rgb[..., 1] * 38470 + rgb[..., 2] * 7471 + 32768) >> 16).astype(np.uint8)


def adaptive_resolution(gray: np.ndarray, scale_resolution: int = SCALE_RESOLUTION) -> int | None:
    """The published `adaptive_upsize_resolution` of an image (or cell) given as its luma: `scale_resolution` for
    small dense text (median glyph height <= 12 px, >= 2 glyphs per 1000 px: Otsu threshold, 8-connected
    components), TINY_RESOLUTION for images under TINY_PIXELS, otherwise None (native size)."""
    cv2 = _cv2()
    height, width = gray.shape
    if height <= 0 or width <= 0:
        return None
    _, binarized = cv2.threshold(np.ascontiguousarray(gray), 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    foreground = binarized == 0
    if foreground.mean() > 0.5:
        foreground = ~foreground
    _, _, stats, _ = cv2.connectedComponentsWithStats(foreground.astype(np.uint8), connectivity=8)
    glyph_width, glyph_height, area = stats[1:, 2], stats[1:, 3], stats[1:, 4]   # label 0 is the background
    heights = glyph_height[(area >= 3) & (glyph_height >= 2) & (glyph_width < 0.9 * width)
                           & (glyph_height < 0.9 * height)]
    font_px = float(np.median(heights)) if len(heights) else 0.0
    density = len(heights) * 1000.0 / (width * height)
    if 0 < font_px <= SMALL_FONT_PX and density >= DENSE_GLYPHS_PER_KPX:
        return scale_resolution
    if height * width < TINY_PIXELS:
        return TINY_RESOLUTION
    return None


def _adaptive_recut(gray: np.ndarray, grid: tuple[int, int], base: tuple[int, int],
                    align: int) -> tuple[Recut | None, ...]:
    """The processor's `_resolve_tile_size` for every slice: a cell of the original image (rounded boundaries)
    at its adaptive size where that is fewer pixels than the refined image's cell `base`."""
    height, width = gray.shape
    columns, rows = grid
    out: list[Recut | None] = []
    for index in range(columns * rows):
        row, column = index // columns, index % columns
        top, bottom = round(height * row / rows), round(height * (row + 1) / rows)
        left, right = round(width * column / columns), round(width * (column + 1) / columns)
        cell_w, cell_h = right - left, bottom - top
        if cell_h < 1 or cell_w < 1 or cell_h * cell_w > SCALE_RESOLUTION ** 2:
            out.append(None)
            continue
        resolution = adaptive_resolution(gray[top:bottom, left:right])
        if resolution == SCALE_RESOLUTION:
            out.append(None)
            continue
        target = find_best_resize((cell_w, cell_h), resolution or SCALE_RESOLUTION, align,
                                  allow_upscale=resolution is not None)
        out.append(None if target[0] * target[1] >= base[0] * base[1] else Recut((left, top, right, bottom), target))
    return tuple(out)


def plan_slices(size: tuple[int, int], max_slice_nums: int = DEFAULT_MAX_SLICE_NUMS,
                align: int = PATCH_SIZE, small_image_upsize: str = "always",
                image: Image.Image | None = None) -> SliceLayout:
    """The pieces of an image of `size`. `small_image_upsize` (MiniCPM-OCR's processor option; every other
    family's processor does "always") says how an image that is not sliced is sized: "always" scales it to
    about 448^2 pixels, "never" keeps its native size, both aligned to `align` (an image larger than 448^2
    shrinks either way); "adaptive" decides from the glyphs of `image` (required, of `size`), per image when
    it is not sliced and per slice when it is (OpenCV, imported only then)."""
    if small_image_upsize not in UPSIZE_MODES:
        raise UnsupportedUpsize(f"small_image_upsize {small_image_upsize!r} is not supported by this runtime "
                                f"(it lays out {', '.join(repr(m) for m in UPSIZE_MODES)})")
    gray = None
    if small_image_upsize == "adaptive":
        if image is None or image.size != tuple(size):
            raise ValueError("small_image_upsize 'adaptive' lays out from the image's content: pass image=")
        _cv2()
        gray = luma(image)
    grid = sliced_grid(size, max_slice_nums)
    if grid is None:
        if gray is not None:
            resolution = adaptive_resolution(gray)
            return SliceLayout(find_best_resize(size, resolution or SCALE_RESOLUTION, align,
                                                allow_upscale=resolution is not None))
        return SliceLayout(find_best_resize(size, patch_size=align, allow_upscale=small_image_upsize == "always"))
    layout = SliceLayout(find_best_resize(size, patch_size=align), grid, refine_size(size, grid, patch_size=align))
    if gray is None or layout.slice_size is None:
        return layout
    recut = _adaptive_recut(gray, grid, layout.slice_size, align)
    return SliceLayout(layout.overview, grid, layout.refined, recut if any(recut) else ())


def cut(image: Image.Image, layout: SliceLayout) -> list[Image.Image]:
    """The overview, then the slices row by row, each resized with bicubic as the published processor does
    (an "adaptive" re-cut slice from the original image, resized only where its size changes)."""
    pieces = [image.resize(layout.overview, Image.Resampling.BICUBIC)]
    if layout.grid is not None and layout.refined is not None and layout.slice_size is not None:
        refined = image.resize(layout.refined, Image.Resampling.BICUBIC)
        width, height = layout.slice_size
        index = 0
        for top in range(0, layout.refined[1], height):
            for left in range(0, layout.refined[0], width):
                recut = layout.recut[index] if layout.recut else None
                index += 1
                if recut is None:
                    pieces.append(refined.crop((left, top, left + width, top + height)))
                    continue
                cell = image.crop(recut.box)
                pieces.append(cell if cell.size == recut.size else cell.resize(recut.size, Image.Resampling.BICUBIC))
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
