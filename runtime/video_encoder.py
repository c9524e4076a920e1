"""MiniCPM-V's vision tower and 3D resampler as our own ggml graph, built from the mmproj's tensors: one group of
frames (MiniCPM-V 4.5's video packing) -> one block of query tokens.

clip.cpp runs the ViT and the resampler as one graph per image and takes no temporal positions, so this module
builds the same graph itself (op for op as clip.cpp's `clip_graph_minicpmv::build` with flash attention, on the
same CPU backend and the same weights in their stored types) with what the published 3D resampler adds
(hub `resampler.py` of MiniCPM-V 4.5: `get_1d_sincos_pos_embed_from_temporal_size`, `foreach_attn_forward`):

- each frame's ViT features -> kv_proj -> ln_kv = the values; keys = values + the 2-D sin-cos position of the
  frame's patch grid + the frame's 1-D sin-cos temporal embedding (temporal id in 0.1 s ticks; -1, a still
  image, adds zeros);
- the keys and values of all frames of a group are concatenated and the queries attend over them once;
- ln_post, proj.

A still image is a group of one frame with id -1. The ViT's position ids are the published ones (float32
bucketize, `published_position_ids`), which differ from clip.cpp's floor(70 * i / n) for some patch counts.
"""

from __future__ import annotations

import math
from functools import lru_cache
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from .ggml_vision import (GGML_PREC_F32, GGML_TYPE_F16, Allocator, CpuBackend, GgufWeights, Graph, api,
                          graph_memory, shape)
from .engine import EngineError
from .pair import read_metadata
from .vision import VisionError

# published: nn.MultiheadAttention(embed_dim, embed_dim // 128) in the resampler; clip.cpp fixes d_head = 128
RESAMPLER_HEAD_SIZE = 128
# torch.arange's float32 CPU kernel writes 8-float vector blocks (AVX2's Vectorized<float>; it matches torch's
# output on AVX-512 machines too, checked in tests for 1..1100 patches): the published ids depend on that rounding.
_TORCH_ARANGE_VECTOR = 8
Frame = Image.Image | np.ndarray


def _torch_arange_f32(start: float, step: float, count: int) -> np.ndarray:
    """torch.arange(start, ., step) in float32 on the CPU, value for value: whole vector pairs are computed as
    float32(base) + j * step (in double) with base = float32(start + i * step), the tail as start + i * step."""
    out = np.empty(count, dtype=np.float32)
    block = 2 * _TORCH_ARANGE_VECTOR
    whole = count - count % block
    for i in range(0, whole, _TORCH_ARANGE_VECTOR):
        base = np.float64(np.float32(start + step * i))
        out[i:i + _TORCH_ARANGE_VECTOR] = base + np.arange(_TORCH_ARANGE_VECTOR) * step
    tail = np.arange(whole, count)
    out[whole:] = start + step * tail
    return out


def published_buckets(count: int, side: int) -> np.ndarray:
    """The published navit-SigLIP bucket of each of `count` patches along one axis of a `side` x `side` position
    table: bucketize(arange(0, 1 - 1e-6, 1 / count), arange(1 / side, 1, 1 / side), right=True), 1 / count being
    a float32 quotient."""
    step = float(np.float32(1) / np.float32(count))
    coords = _torch_arange_f32(0.0, step, math.ceil((1 - 1e-6) / step))
    edges = _torch_arange_f32(1 / side, 1 / side, math.ceil((1 - 1 / side) / (1 / side)))
    return np.searchsorted(edges, coords, side="right")


def vit_position_ids(grid_h: int, grid_w: int, side: int) -> np.ndarray:
    """Row-major ids into the side x side ViT position table for a grid_h x grid_w patch grid."""
    return (published_buckets(grid_h, side)[:, None] * side + published_buckets(grid_w, side)[None, :]).reshape(-1)


def _sincos(positions: np.ndarray, dim: int) -> np.ndarray:
    """[..] -> [.., dim] float32 as the published numpy code: sin(p * w) then cos(p * w), w = 1 / 10000^(i / (dim/2))."""
    omega = np.arange(dim // 2, dtype=np.float32)
    omega /= dim / 2.0
    omega = 1.0 / 10000 ** omega
    angles = positions.astype(np.float32)[..., None] * omega
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=-1)


@lru_cache(maxsize=8)
def sincos_2d(dim: int, grid_h: int, grid_w: int) -> np.ndarray:
    """[grid_h * grid_w, dim], read-only (cached: a video's frames share a grid): the first half encodes the
    column, the second the row (published get_2d_sincos_pos_embed)."""
    rows, cols = np.meshgrid(np.arange(grid_h, dtype=np.float32), np.arange(grid_w, dtype=np.float32), indexing="ij")
    table = np.concatenate([_sincos(cols, dim // 2), _sincos(rows, dim // 2)], axis=-1).reshape(grid_h * grid_w, dim)
    table.flags.writeable = False
    return table


def temporal_embedding(dim: int, temporal_id: int) -> np.ndarray:
    """[dim]: get_1d_sincos_pos_embed_from_temporal_size's row for the id; zeros for -1 (a still image)."""
    if temporal_id == -1:
        return np.zeros(dim, dtype=np.float32)
    return _sincos(np.array([temporal_id], dtype=np.float32), dim)[0]


class VideoEncoder:
    """The mmproj of a resampler family on ggml's CPU backend: `encode_group(frames, temporal_ids)` ->
    [query_num, n_embd] float32. Not thread-safe."""

    def __init__(self, mmproj_path: Path | str, n_threads: int) -> None:
        try:
            meta = read_metadata(Path(mmproj_path))
        except EngineError as exc:
            raise VisionError(str(exc)) from None
        if meta.get("clip.projector_type") != "resampler":
            raise VisionError(f"{mmproj_path} is not a MiniCPM-V resampler mmproj "
                              f"(clip.projector_type {meta.get('clip.projector_type')!r})")
        if not meta.get("clip.use_gelu", False):
            raise VisionError(f"{mmproj_path}: the SigLIP tower of MiniCPM-V uses GELU (clip.use_gelu)")
        self.patch_size = int(meta["clip.vision.patch_size"])
        self.n_layer = int(meta["clip.vision.block_count"])
        self.vit_heads = int(meta["clip.vision.attention.head_count"])
        self.eps = float(meta["clip.vision.attention.layer_norm_epsilon"])
        self.query_num = int(meta.get("clip.minicpmv_query_num", 64))
        self._mean = np.asarray(meta["clip.vision.image_mean"], dtype=np.float32)
        self._std = np.asarray(meta["clip.vision.image_std"], dtype=np.float32)
        self._backend = CpuBackend(n_threads)
        self._weights: GgufWeights | None = None
        self._allocator: Allocator | None = None
        try:
            self._weights = GgufWeights(mmproj_path, self._backend)
            self._allocator = Allocator(self._backend)
            self._graph_memory = graph_memory()
            self._check_weights(mmproj_path)
        except BaseException:
            self.close()
            raise

    def _w(self, name: str) -> int:
        tensor = self._weights.get(name)
        if tensor is None:
            raise VisionError(f"the mmproj lacks the tensor {name}")
        return tensor

    def _check_weights(self, path: Path | str) -> None:
        """Every shape the graph relies on, checked here: a mismatch inside ggml would abort the process."""
        self.vit_dim = shape(self._w("v.patch_embd.weight"))[3]
        self.embed_dim, query_num = shape(self._w("resampler.query"))[:2]
        self.n_embd = shape(self._w("resampler.proj.weight"))[1]
        positions = shape(self._w("v.position_embd.weight"))[1]
        self.position_side = math.isqrt(positions)
        vit, dim = self.vit_dim, self.embed_dim
        ff = shape(self._w("v.blk.0.ffn_up.weight"))[1]
        expected = {
            "v.patch_embd.weight": (self.patch_size, self.patch_size, 3, vit), "v.patch_embd.bias": (vit,),
            "v.position_embd.weight": (vit, self.position_side ** 2), "resampler.query": (dim, self.query_num),
            "resampler.kv.weight": (vit, dim), "resampler.proj.weight": (dim, self.n_embd),
        }
        if self._weights.get("v.post_ln.weight") is not None:
            expected |= {"v.post_ln.weight": (vit,), "v.post_ln.bias": (vit,)}
        for prefix, width, linears, norms in [(f"v.blk.{il}.", vit, ("attn_q", "attn_k", "attn_v", "attn_out"),
                                               ("ln1", "ln2")) for il in range(self.n_layer)] + [
                ("resampler.", dim, ("attn.q", "attn.k", "attn.v", "attn.out"), ("ln_q", "ln_kv", "ln_post"))]:
            for name in linears:
                expected |= {f"{prefix}{name}.weight": (width, width), f"{prefix}{name}.bias": (width,)}
            for name in norms:
                expected |= {f"{prefix}{name}.weight": (width,), f"{prefix}{name}.bias": (width,)}
        for il in range(self.n_layer):
            expected |= {f"v.blk.{il}.ffn_up.weight": (vit, ff), f"v.blk.{il}.ffn_up.bias": (ff,),
                         f"v.blk.{il}.ffn_down.weight": (ff, vit), f"v.blk.{il}.ffn_down.bias": (vit,)}
        wrong = {name: shape(self._w(name)) for name, want in expected.items()
                 if shape(self._w(name)) != want + (1,) * (4 - len(want))}
        if wrong or query_num != self.query_num or self.position_side ** 2 != positions:
            raise VisionError(f"{path}: tensor shapes unlike a MiniCPM-V resampler mmproj's: {wrong or positions}")
        if vit % self.vit_heads or dim % RESAMPLER_HEAD_SIZE:
            raise VisionError(f"{path}: widths {vit} / {dim} do not split into {self.vit_heads} heads / "
                              f"{RESAMPLER_HEAD_SIZE}-wide heads")

    def close(self) -> None:
        for part in (self._allocator, self._weights, self._backend):
            if part is not None:
                part.close()

    def __enter__(self) -> "VideoEncoder":
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def _pixels(self, frames: Sequence[Frame]) -> np.ndarray:
        """[B, 3, H, W] normalised float32 (the processor's (x / 255 - mean) / std)."""
        arrays = [np.asarray(f.convert("RGB") if isinstance(f, Image.Image) else f) for f in frames]
        sizes = {a.shape for a in arrays}
        if len(sizes) != 1:
            raise VisionError(f"the frames of one group must share a size, got {sorted(sizes)}")
        (height, width, *channels), = sizes
        if channels != [3] or arrays[0].dtype != np.uint8:
            raise VisionError(f"a frame must be RGB uint8 HxWx3, got {arrays[0].dtype} {arrays[0].shape}")
        if height % self.patch_size or width % self.patch_size or not height or not width:
            raise VisionError(f"a {width}x{height} frame is not a multiple of the {self.patch_size}-pixel patch")
        x = np.stack(arrays).astype(np.float32) / np.float32(255.0)
        x = (x - self._mean) / self._std
        return np.ascontiguousarray(x.transpose(0, 3, 1, 2), dtype=np.float32)

    def encode_group(self, frames: Sequence[Frame], temporal_ids: Sequence[int]) -> np.ndarray:
        """One group of frames (same size, already resized to the piece) -> [query_num, n_embd] float32."""
        if not frames:
            raise VisionError("a frame group needs at least one frame")
        if len(frames) != len(temporal_ids):
            raise VisionError(f"{len(frames)} frames but {len(temporal_ids)} temporal ids")
        if any(int(t) < -1 for t in temporal_ids):
            raise VisionError(f"temporal ids are ticks >= 0, or -1 for a still image: {list(temporal_ids)}")
        pixels = self._pixels(frames)
        n_frames, _, height, width = pixels.shape
        grid_h, grid_w = height // self.patch_size, width // self.patch_size
        pos2d = sincos_2d(self.embed_dim, grid_h, grid_w)
        key_pos = np.stack([pos2d + temporal_embedding(self.embed_dim, int(t)) for t in temporal_ids])
        graph = Graph(self._graph_memory)
        try:
            output = self._build(graph, n_frames, width, height)
            return graph.run(output, self._backend, self._allocator.handle, {
                "pixels": pixels,
                "positions": vit_position_ids(grid_h, grid_w, self.position_side).astype(np.int32),
                "key_pos": key_pos,
            })
        finally:
            graph.close()

    def _norm(self, g: Graph, x: int, prefix: str) -> int:
        return g.op("add", g.op("mul", g.op("norm", x, self.eps), self._w(prefix + ".weight")), self._w(prefix + ".bias"))

    def _linear(self, g: Graph, x: int, prefix: str) -> int:
        return g.op("add", g.op("mul_mat", self._w(prefix + ".weight"), x), self._w(prefix + ".bias"))

    def _attention(self, g: Graph, q: int, k: int, v: int, scale: float) -> int:
        """clip.cpp's build_attn with flash attention: q/k/v [d_head, n_head, n, B] -> [d_head * n_head, n * B]."""
        q, k, v = (g.op("permute", t, 0, 2, 1, 3) for t in (q, k, v))
        k, v = g.op("cast", k, GGML_TYPE_F16), g.op("cast", v, GGML_TYPE_F16)
        out = g.op("flash_attn_ext", q, k, v, None, scale, 0.0, 0.0)
        api().prec_set_acc(out, GGML_PREC_F32)
        ne = shape(out)
        return g.op("reshape_2d", out, ne[0] * ne[1], ne[2] * ne[3])

    def _build(self, g: Graph, n_frames: int, width: int, height: int) -> int:
        """The ViT of n_frames frames (one batch) and the resampler over all of them -> [n_embd, query_num]."""
        n_pos = (width // self.patch_size) * (height // self.patch_size)
        dim, heads = self.vit_dim, self.vit_heads
        d_head = dim // heads
        pixels = g.input("pixels", np.float32, width, height, 3, n_frames)
        positions = g.input("positions", np.int32, n_pos)
        key_pos = g.input("key_pos", np.float32, self.embed_dim, n_pos * n_frames)

        # patch embedding (clip.cpp build_inp) + learned position embedding
        x = g.op("conv_2d", self._w("v.patch_embd.weight"), pixels, self.patch_size, self.patch_size, 0, 0, 1, 1)
        x = g.op("reshape_3d", x, n_pos, dim, n_frames)
        x = g.op("add", g.op("cont", g.op("transpose", x)), self._w("v.patch_embd.bias"))
        x = g.op("add", x, g.op("get_rows", self._w("v.position_embd.weight"), positions))
        x = g.op("reshape_2d", x, dim, n_pos * n_frames)
        for il in range(self.n_layer):  # clip.cpp build_vit, NORM_TYPE_NORMAL, FFN_GELU
            blk = f"v.blk.{il}."
            cur = self._norm(g, x, blk + "ln1")
            q, k, v = (g.op("reshape_4d", self._linear(g, cur, blk + f"attn_{p}"), d_head, heads, n_pos, n_frames)
                       for p in "qkv")
            cur = self._linear(g, self._attention(g, q, k, v, 1.0 / math.sqrt(d_head)), blk + "attn_out")
            x = g.op("add", cur, x)
            cur = self._norm(g, x, blk + "ln2")
            cur = self._linear(g, g.op("gelu", self._linear(g, cur, blk + "ffn_up")), blk + "ffn_down")
            x = g.op("add", x, cur)
        if self._weights.get("v.post_ln.weight") is not None:
            x = self._norm(g, x, "v.post_ln")

        # resampler: the group's frames are one key/value sequence of n_pos * n_frames
        n_kv = n_pos * n_frames
        r_heads = self.embed_dim // RESAMPLER_HEAD_SIZE
        values = self._norm(g, g.op("mul_mat", self._w("resampler.kv.weight"), x), "resampler.ln_kv")
        keys = g.op("add", values, key_pos)
        query = self._norm(g, self._w("resampler.query"), "resampler.ln_q")
        q = g.op("reshape_3d", self._linear(g, query, "resampler.attn.q"), RESAMPLER_HEAD_SIZE, r_heads, self.query_num)
        k = g.op("reshape_3d", self._linear(g, keys, "resampler.attn.k"), RESAMPLER_HEAD_SIZE, r_heads, n_kv)
        v = g.op("reshape_3d", self._linear(g, values, "resampler.attn.v"), RESAMPLER_HEAD_SIZE, r_heads, n_kv)
        out = self._attention(g, q, k, v, 1.0 / math.sqrt(RESAMPLER_HEAD_SIZE))
        out = self._norm(g, self._linear(g, out, "resampler.attn.out"), "resampler.ln_post")
        return g.op("mul_mat", self._w("resampler.proj.weight"), out)
