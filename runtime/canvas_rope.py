"""MiniCPM-V 4.7's canvas M-RoPE: the (T, H, W) position of every prompt item, as transformers'
`MiniCPMV4_7Model.get_rope_index` defines them (models/minicpmv4_7, the authority this follows), and the
engine plan that feeds them to llama.cpp.

The canvas, per frame (a thumbnail `<image>...</image>` and the slices that follow it, `<slice>...</slice>`
in rows separated by "\\n"): every token of the frame has T = the frame's origin (the next sequential
position); the slices tile a canvas of rows x slice height by columns x slice width LLM tokens at their
offsets; the thumbnail is stretched over that canvas (rounded even spacing); `<image>` sits one step above
and left of the canvas, `</image>` on its far corner, `<slice>` / `</slice>` on their slice's corners, a row's
"\\n" just right of the row's last token row; text after the frame continues at origin + max(height, width)
+ 1. Frames separated only by markers form one group (a video's frames; a picture right against another).

llama.cpp takes one position per token in token batches, so every item, text included, is decoded as an
embedding row (text rows are the GGUF's own token embeddings) with four positions: [sequence index, H, W,
T]; the converter wrote the file's rope sections as [0, s_h, s_w, s_t] (convert/qwen35.canvas_sections), so
section 0 rotates nothing and orders the KV cache causally by sequence index, as transformers masks."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Hashable, Sequence

import numpy as np

from minicpmv_edge.families import Family
from minicpmv_edge.families.minicpmv4_7 import CANVAS_KEY

from .engine import EngineError


@dataclass(frozen=True)
class Markers:
    """Token ids of the five markers canvas positions are pinned to (config.json's image_start_id,
    image_end_id, slice_start_id, slice_end_id, newline_id; our converter stores them under CANVAS_KEY)."""

    image_start: int
    image_end: int
    slice_start: int
    slice_end: int
    newline: int

    @property
    def all(self) -> frozenset[int]:
        return frozenset((self.image_start, self.image_end, self.slice_start, self.slice_end, self.newline))


def _linspace_float32(stop: int, count: int) -> np.ndarray:
    """torch.linspace(0, stop, count) as torch computes it in float32 (the first half counted up from 0, the
    second down from `stop`), so that rounding ties fall the same way."""
    if count == 1:
        return np.zeros(1, np.float32)
    step = np.float32(stop) / np.float32(count - 1)
    index = np.arange(count)
    up = step * index.astype(np.float32)
    down = np.float32(stop) - step * (count - 1 - index).astype(np.float32)
    return np.where(index < count / 2, up, down).astype(np.float32)


def _grid_positions(rows: int, cols: int, canvas_h: int, canvas_w: int) -> tuple[np.ndarray, np.ndarray]:
    """(H, W) offsets of a rows x cols token grid spread evenly over a canvas_h x canvas_w canvas, row-major."""
    h = np.round(_linspace_float32(canvas_h - 1, rows)).astype(np.int64)
    w = np.round(_linspace_float32(canvas_w - 1, cols)).astype(np.int64)
    return np.repeat(h, cols), np.tile(w, rows)


@dataclass
class _Frame:
    thumb: tuple[int, int]          # [start, end) of the thumbnail's rows
    slices: list[tuple[int, int]]
    end: int = 0                    # one past the markers closing the frame


def _runs(is_image: Sequence[bool]) -> list[tuple[int, int]]:
    runs, start = [], None
    for index, image in enumerate([*is_image, False]):
        if image and start is None:
            start = index
        elif not image and start is not None:
            runs.append((start, index))
            start = None
    return runs


def _groups(ids: Sequence[int], crops: list[tuple[int, int]], markers: Markers) -> list[list[_Frame]]:
    """Crops -> frames (a crop right after `<slice>` is a slice of the frame before) -> groups (frames with
    nothing but markers between them)."""
    marker_ids = markers.all
    groups: list[list[_Frame]] = []
    previous_end = 0
    for start, end in crops:
        if groups and ids[start - 1] == markers.slice_start:
            groups[-1][-1].slices.append((start, end))
        else:
            frame = _Frame((start, end), [])
            if groups and all(t in marker_ids for t in ids[previous_end:start - 1]):
                groups[-1].append(frame)
            else:
                groups.append([frame])
        previous_end = end
    for frames in groups:
        for frame in frames:
            end = frame.slices[-1][1] if frame.slices else frame.thumb[1]
            while end < len(ids) and ids[end] in marker_ids:
                end += 1
            frame.end = end
    return groups


def canvas_positions(ids: Sequence[int], grids: Sequence[tuple[int, int] | None], markers: Markers) -> np.ndarray:
    """[3, n] positions (T, H, W) of a prompt: `ids[i]` the token id of text item i, `grids[i]` the (rows,
    columns) LLM-token grid of the image piece item i is a row of (None for text)."""
    n = len(ids)
    pos = np.zeros((3, n), np.int64)
    crops = _runs([g is not None for g in grids])
    cursor, next_pos = 0, 0

    def sequential(start: int, end: int) -> None:
        nonlocal next_pos
        pos[:, start:end] = np.arange(end - start) + next_pos
        next_pos += end - start

    for frames in _groups(ids, crops, markers):
        group_start, group_end = frames[0].thumb[0] - 1, frames[-1].end
        sequential(cursor, group_start)
        frame_cursor = group_start
        for frame in frames:
            frame_start = frame.thumb[0] - 1
            if frame_start > frame_cursor:   # text between two frames of a group, then one step of space
                sequential(frame_cursor, frame_start)
                next_pos += 1
            frame_end = min(frame.end, group_end)
            origin = next_pos
            thumb_rows, thumb_cols = grids[frame.thumb[0]]
            canvas_h, canvas_w = thumb_rows, thumb_cols
            cols = rows = slice_h = slice_w = 0
            if frame.slices:
                # A gap wider than `</slice><slice>` holds the row's newline: it fixes the column count.
                cols = next((k + 1 for k in range(len(frame.slices) - 1)
                             if frame.slices[k + 1][0] - frame.slices[k][1] > 2), len(frame.slices))
                rows = len(frame.slices) // cols
                if rows * cols != len(frame.slices):
                    rows, cols = 1, len(frame.slices)
                slice_h, slice_w = grids[frame.slices[0][0]]
                canvas_h, canvas_w = rows * slice_h, cols * slice_w
            pos[:, frame_start:frame_end] = origin
            pos[1:, frame_start] = max(origin - 1, 0)
            if frame.thumb[1] < frame_end:
                pos[1:, frame.thumb[1]] = origin + np.array([canvas_h, canvas_w])
            h, w = _grid_positions(thumb_rows, thumb_cols, canvas_h, canvas_w)
            pos[1, frame.thumb[0]:frame.thumb[1]] = origin + h
            pos[2, frame.thumb[0]:frame.thumb[1]] = origin + w
            for k, (start, end) in enumerate(frame.slices):
                top, left = (k // cols) * slice_h, (k % cols) * slice_w
                piece_h, piece_w = grids[start]
                if start - 1 >= frame_start:
                    pos[1:, start - 1] = origin + np.array([top, left])
                if end < frame_end:
                    pos[1:, end] = origin + np.array([top + piece_h - 1, left + piece_w - 1])
                h, w = _grid_positions(piece_h, piece_w, piece_h, piece_w)
                pos[1, start:end] = origin + top + h
                pos[2, start:end] = origin + left + w
            for k in range(len(frame.slices) - 1):
                gap_start, gap_end = frame.slices[k][1], frame.slices[k + 1][0]
                if gap_end - gap_start > 2:
                    pos[1, gap_start + 1:gap_end - 1] = origin + (k // cols + 1) * slice_h - 1
                    pos[2, gap_start + 1:gap_end - 1] = origin + cols * slice_w
            next_pos = origin + max(canvas_h, canvas_w) + 1
            frame_cursor = frame_end
        sequential(frame_cursor, group_end)
        cursor = group_end
    sequential(cursor, n)
    return pos


class CanvasModel:
    """What canvas positions need from the language model GGUF (read with gguf's reader: llama.cpp keeps no
    array metadata): the markers under CANVAS_KEY, and the token embedding matrix (token_embd.weight,
    dequantized row by row as ggml's get_rows does), since text items are fed as embedding rows."""

    def __init__(self, family: Family, model_path: Path):
        from gguf import GGUFReader

        reader = GGUFReader(model_path)
        field = reader.fields.get(CANVAS_KEY)
        values = [int(v) for v in field.contents()] if field is not None else []
        if len(values) != 5:
            # Another converter's file (llama.cpp's writes canvas positions for its own, newer runtime).
            raise EngineError(f"this {family.title} language model has no {CANVAS_KEY} (not written by minicpmv "
                              f"convert), so its canvas M-RoPE positions cannot be honoured here; convert the "
                              f"checkpoint with minicpmv convert")
        self.markers = Markers(*values)
        tensor = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
        if tensor is None:
            raise EngineError(f"{model_path} has no token_embd.weight")
        self._data, self._type = tensor.data, tensor.tensor_type

    def token_rows(self, tokens: Sequence[int]) -> np.ndarray:
        from gguf.quants import dequantize

        rows = np.asarray(self._data[np.asarray(tokens, dtype=np.int64)])
        return np.ascontiguousarray(dequantize(rows, self._type), dtype=np.float32)


PieceKey = Hashable
PromptItem = Any  # int (token id) or (piece key, row)


class CanvasPlan:
    """The engine's position plan for a canvas family: `positions(items)` -> int32 [n, 4] as [sequence index,
    H, W, T], and `token_rows(tokens)` -> the token embeddings text items are fed as. `grid_of(key)` is the
    (rows, columns) LLM-token grid of an image piece."""

    def __init__(self, markers: Markers, token_rows: Callable[[Sequence[int]], np.ndarray],
                 grid_of: Callable[[PieceKey], tuple[int, int]]):
        self.markers, self.token_rows, self.grid_of = markers, token_rows, grid_of

    def positions(self, items: Sequence[PromptItem]) -> np.ndarray:
        ids = [item if isinstance(item, int) else -1 for item in items]
        grids = [None if isinstance(item, int) else self.grid_of(item[0]) for item in items]
        thw = canvas_positions(ids, grids, self.markers)
        out = np.empty((len(items), 4), np.int32)
        out[:, 0] = np.arange(len(items))
        out[:, 1], out[:, 2], out[:, 3] = thw[1], thw[2], thw[0]
        return out
