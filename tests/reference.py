"""Independent torch references of the published MiniCPM-V / MiniCPM-o "resampler" models (test-only code).

Written from the published formulas, not copied. Sources (repository + path; "hub" = the model repo's remote
code as mirrored in the listed GitHub repository):

* Vision tower: transformers' `Idefics2VisionTransformer` (same module and tensor names as the hub's
  `modeling_navit_siglip.SiglipVisionTransformer`), with the position ids the published code computes:
  hub `modeling_navit_siglip.py` (`OpenBMB/MiniCPM-o-Demo` MiniCPMO45/, same file in 2.6/4.0/4.5):
  `boundaries = arange(1/n, 1, 1/n)`, `coords = arange(0, 1 - 1e-6, 1/nb)`, `bucketize(coords, boundaries,
  right=True)`, id = `bucket_h * n + bucket_w`, with `nb` from `tgt_sizes` (the slice's patch grid).
  MiniCPM-Llama3-V 2.5 (hub `modeling_minicpmv.py`, e.g. OpenBMB/MiniCPM-V issue #322 quotes it) calls
  transformers' own Idefics2VisionTransformer of its day with a `[B, 1, L]` patch mask and no `tgt_sizes`, so its
  grid is 1 x L: every patch k gets the id `bucket(k / L)` of the table's first row ("flat" below).
* Resampler: hub `resampler.py` (`PcOffeeP/FineTune_MLLM` Model/MiniCPM-VL-4.5/resampler.py for the 3D one,
  `OpenBMB/MiniCPM-o-Demo` MiniCPMO45/modeling_minicpmo.py for the 2D one): q = ln_q(query); x = ln_kv(kv_proj(x));
  k = x + pos2d (2D sin-cos of the tgt grid), v = x [+ temporal sin-cos on k only, 3D]; torch
  MultiheadAttention (heads = embed_dim // 128); ln_post; `x @ proj`.
* Image embeddings into the LLM: hub `get_vllm_embedding` (2.5 file above, 4.5 mirror, transformers PR #39899
  `src/transformers/models/minicpm_v_4/modular_minicpm_v_4.py`): text embeddings are multiplied by `scale_emb`
  only if the LLM config has one; image embeddings are scattered in afterwards, unscaled; the LLM then gets
  `inputs_embeds` (which the MiniCPM LLM does not rescale).
* MiniCPM LLM (used whenever config.json carries `scale_emb` / `scale_depth` / `dim_model_base`): hub
  `modeling_minicpm.py` of the MiniCPM LLMs: embeddings x scale_emb (input_ids path only), residual branches x
  scale_depth / sqrt(num_layers), final RMSNorm, logits = lm_head(h / (hidden / dim_model_base)), LongRoPE
  `MiniCPMLongRoPE` (cos and sin x sqrt(1 + log(max_pos / orig) / log(orig)); the factor list is chosen once,
  long iff max_position_embeddings > original_max_position_embeddings).

Families: each registry family's `reference` hints (`ReferenceHints` in families/specs.py: LLM builder, ViT grid,
resampler kind, source). MiniCPM-V 4.0's published LLM is Llama-form (`LlamaForCausalLM` in vLLM's
`MiniCPMV4_0.init_llm` and in transformers PR #39899; its config has LongRoPE but no MiniCPM scales), so it runs
on transformers' LlamaForCausalLM unless its config.json has the MiniCPM scale keys.
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors import safe_open
from torch import nn

from minicpmv_edge.families import UnknownFamily, from_config
from minicpmv_edge.families.specs import ReferenceHints

__all__ = [
    "MiniCPMForCausalLM", "Resampler", "encode_image_reference", "encode_video_reference", "family_of",
    "image_bounds", "language_model", "llm_input_embeddings", "llm_kind", "load_state", "preprocess_448",
    "published_position_ids", "read_config", "resampler", "sincos_pos_embed_1d", "sincos_pos_embed_2d",
    "vision_features", "vision_tower",
]


# --------------------------------------------------------------------------------------------------------------
# Per-family facts: the registry's `Family.reference` (everything below is generic)
# --------------------------------------------------------------------------------------------------------------

# config.json keys of the MiniCPM LLM's muP-style scalings; any of them selects our MiniCPM decoder.
MINICPM_KEYS = ("scale_emb", "scale_depth", "dim_model_base")

# top-level config.json keys that belong to the multimodal wrapper, not to the LLM config class
_NON_LLM_KEYS = {
    "vision_config", "slice_config", "audio_config", "tts_config", "auto_map", "architectures", "model_type",
    "_name_or_path", "torch_dtype", "dtype", "transformers_version",
}


def read_config(folder: Path | str) -> dict[str, Any]:
    return json.loads((Path(folder) / "config.json").read_text())


def family_of(config: dict[str, Any]) -> ReferenceHints:
    """The reference hints of a config.json's family (`families.from_config(config).reference`; configs without
    `version` are 2.5)."""
    try:
        hints = from_config(config).reference
    except UnknownFamily as exc:
        raise ValueError(f"no reference: {exc}") from None
    if hints is None:
        raise ValueError(f"no reference for {from_config(config).title} in reference.py")
    return hints


def llm_kind(config: dict[str, Any]) -> str:
    return "minicpm" if any(k in config for k in MINICPM_KEYS) else family_of(config).llm


# --------------------------------------------------------------------------------------------------------------
# Weights
# --------------------------------------------------------------------------------------------------------------

def load_state(folder: Path | str, prefix: str) -> dict[str, torch.Tensor]:
    """float32 tensors whose names start with `prefix`, prefix stripped, read shard by shard via the index."""
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.exists():
        weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
    else:
        with safe_open(folder / "model.safetensors", framework="pt") as f:
            weight_map = {k: "model.safetensors" for k in f.keys()}
    by_shard: dict[str, list[str]] = {}
    for name, shard in weight_map.items():
        if name.startswith(prefix):
            by_shard.setdefault(shard, []).append(name)
    state: dict[str, torch.Tensor] = {}
    for shard, names in by_shard.items():
        with safe_open(folder / shard, framework="pt") as f:
            for name in names:
                state[name[len(prefix):]] = f.get_tensor(name).to(torch.float32)
    if not state:
        raise ValueError(f"no tensors with prefix {prefix!r} in {folder}")
    return state


# --------------------------------------------------------------------------------------------------------------
# Vision tower
# --------------------------------------------------------------------------------------------------------------

def published_position_ids(grid_h: int, grid_w: int, num_patches_per_side: int) -> torch.Tensor:
    """Row-major ids into the n x n position table for a grid_h x grid_w patch grid, in the published float32
    arithmetic: `bucketize(arange(0, 1 - 1e-6, 1/nb), arange(1/n, 1, 1/n), right=True)` per axis, where 1/nb is
    the float32 quotient of a torch integer (exact-rational formulas such as floor(n*i/nb) differ for some nb,
    e.g. 25, 49, 50, 55, 58)."""
    n = num_patches_per_side
    edges = torch.arange(1 / n, 1.0, 1 / n)

    def buckets(count: int) -> torch.Tensor:
        step = 1 / torch.tensor(count)  # float32, as `1 / nb_patches` in the published code
        return torch.bucketize(torch.arange(0, 1 - 1e-6, step), edges, right=True)

    rows, cols = buckets(grid_h), buckets(grid_w)
    assert len(rows) == grid_h and len(cols) == grid_w
    return (rows[:, None] * n + cols[None, :]).reshape(-1)


def _idefics2_classes():  # noqa: ANN202
    from transformers import Idefics2VisionConfig
    from transformers.models.idefics2.modeling_idefics2 import Idefics2VisionEmbeddings, Idefics2VisionTransformer

    class PublishedPositionEmbeddings(Idefics2VisionEmbeddings):
        """Idefics2VisionEmbeddings with the published ids: the grid is `position_grid` when set, else taken from
        the patch mask the published way for the family (`grid_scheme` "tgt" or "flat")."""

        grid_scheme = "tgt"
        position_grid: tuple[int, int] | None = None

        def forward(self, pixel_values: torch.Tensor, patch_attention_mask: torch.Tensor) -> torch.Tensor:
            patches = self.patch_embedding(pixel_values).flatten(2).transpose(1, 2)
            ids = torch.zeros(patches.shape[:2], dtype=torch.long, device=patches.device)
            for b, mask in enumerate(patch_attention_mask):
                if self.position_grid is not None:
                    grid = self.position_grid
                elif self.grid_scheme == "flat":
                    grid = (1, int(mask.sum()))
                else:
                    grid = (int(mask[:, 0].sum()), int(mask[0].sum()))
                ids[b, mask.reshape(-1)] = published_position_ids(*grid, self.num_patches_per_side).to(ids.device)
            self.last_position_ids = ids
            return patches + self.position_embedding(ids)

    return Idefics2VisionConfig, Idefics2VisionTransformer, PublishedPositionEmbeddings


def vision_tower(folder: Path | str) -> nn.Module:
    """transformers' Idefics2VisionTransformer from config.json's vision_config with the vpm.* weights, fp32,
    eval, eager attention; its embeddings compute the published position ids (see `published_position_ids`)."""
    config = read_config(folder)
    config_cls, tower_cls, embeddings_cls = _idefics2_classes()
    vc = {k: v for k, v in config["vision_config"].items() if k != "model_type"}
    vision_config = config_cls(**vc)
    vision_config._attn_implementation = "eager"
    tower = tower_cls(vision_config)
    # published: the wrapper drops the last ViT layer when drop_vision_last_layer (class default True)
    drop_last = bool(config.get("drop_vision_last_layer", True))
    if drop_last:
        tower.encoder.layers = tower.encoder.layers[:-1]
    tower.embeddings.__class__ = embeddings_cls
    tower.embeddings.grid_scheme = family_of(config).vit_grid
    state = load_state(folder, "vpm.")
    missing, unexpected = tower.load_state_dict(state, strict=False)
    dropped = f"encoder.layers.{len(tower.encoder.layers)}."
    unexpected = [k for k in unexpected if not k.startswith("head.") and not (drop_last and k.startswith(dropped))]
    if missing or unexpected:
        raise ValueError(f"vpm.* does not fit Idefics2VisionTransformer: missing {missing}, unexpected {unexpected}")
    return tower.float().eval()


def vision_features(tower: nn.Module, pixel_values: torch.Tensor, grid: tuple[int, int] | None = None) -> torch.Tensor:
    """[3, H, W] (or [1, 3, H, W]) -> [1, patches, vision_hidden]; `grid` forces the position grid (published
    MiniCPM passes a [3, 14, L*14] strip with `tgt_sizes`; that is `grid` with a strip input)."""
    pixels = pixel_values[None] if pixel_values.dim() == 3 else pixel_values
    tower.embeddings.position_grid = grid
    try:
        return tower(pixels.float()).last_hidden_state
    finally:
        tower.embeddings.position_grid = None


# --------------------------------------------------------------------------------------------------------------
# Resampler
# --------------------------------------------------------------------------------------------------------------

def _sincos(positions: torch.Tensor, dim: int) -> torch.Tensor:
    """[..] positions -> [.., dim]: sin(p * w_i) for i < dim/2, then cos(p * w_i); w_i = 10000^(-2i/dim); float32
    throughout, as the published numpy code."""
    half = dim // 2
    freqs = 1.0 / torch.pow(torch.tensor(10000.0), torch.arange(half, dtype=torch.float32) / half)
    angles = positions.to(torch.float32)[..., None] * freqs
    return torch.cat([angles.sin(), angles.cos()], dim=-1)


def sincos_pos_embed_2d(embed_dim: int, grid_h: int, grid_w: int) -> torch.Tensor:
    """[grid_h * grid_w, embed_dim], row-major: the first half of the channels encodes the column (w) index, the
    second half the row (h) index (published `get_2d_sincos_pos_embed`: meshgrid with w first)."""
    rows = torch.arange(grid_h).repeat_interleave(grid_w)
    cols = torch.arange(grid_w).repeat(grid_h)
    return torch.cat([_sincos(cols, embed_dim // 2), _sincos(rows, embed_dim // 2)], dim=-1)


def sincos_pos_embed_1d(embed_dim: int, positions: torch.Tensor) -> torch.Tensor:
    """Temporal embedding of the 3D resampler: [M] -> [M, embed_dim]."""
    return _sincos(positions, embed_dim)


class Resampler(nn.Module):
    """One cross-attention layer of learned queries over the ViT patches (published MiniCPM-V resampler).

    Parameters carry the published names (query, kv_proj, attn.in_proj_*, attn.out_proj, ln_q, ln_kv, ln_post,
    proj); the attention is computed here directly, not with torch.nn.MultiheadAttention."""

    def __init__(self, num_queries: int, embed_dim: int, num_heads: int, kv_dim: int | None = None,
                 temporal: bool = False, eps: float = 1e-6) -> None:
        super().__init__()
        assert embed_dim % num_heads == 0
        self.num_queries, self.embed_dim, self.num_heads, self.temporal = num_queries, embed_dim, num_heads, temporal
        self.query = nn.Parameter(torch.zeros(num_queries, embed_dim))
        self.kv_proj = (nn.Linear(kv_dim, embed_dim, bias=False) if kv_dim is not None and kv_dim != embed_dim
                        else nn.Identity())
        self.attn = nn.Module()
        self.attn.in_proj_weight = nn.Parameter(torch.zeros(3 * embed_dim, embed_dim))
        self.attn.in_proj_bias = nn.Parameter(torch.zeros(3 * embed_dim))
        self.attn.out_proj = nn.Linear(embed_dim, embed_dim)
        self.ln_q, self.ln_kv, self.ln_post = (nn.LayerNorm(embed_dim, eps=eps) for _ in range(3))
        self.proj = nn.Parameter(torch.zeros(embed_dim, embed_dim))

    @classmethod
    def from_state(cls, state: dict[str, torch.Tensor], temporal: bool = False,
                   num_heads: int | None = None) -> "Resampler":
        num_queries, embed_dim = state["query"].shape
        kv = state.get("kv_proj.weight")
        module = cls(num_queries, embed_dim, num_heads or embed_dim // 128,  # published: head size 128
                     kv_dim=None if kv is None else kv.shape[1], temporal=temporal)
        module.load_state_dict(state, strict=True)
        return module.float().eval()

    def _attend(self, keys: torch.Tensor, values: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
        """keys/values [B, L, D] (k already carries its position terms), pad [B, L] True = ignore -> [B, Q, D]."""
        d, h = self.embed_dim, self.num_heads
        wq, wk, wv = self.attn.in_proj_weight.split(d)
        bq, bk, bv = self.attn.in_proj_bias.split(d)
        q = self.ln_q(self.query) @ wq.T + bq                                 # [Q, D]
        k = keys @ wk.T + bk                                                  # [B, L, D]
        v = values @ wv.T + bv

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.unflatten(-1, (h, d // h)).transpose(-3, -2)             # [.., h, n, d/h]

        scores = heads(q)[None] @ heads(k).transpose(-1, -2) / math.sqrt(d // h)   # [B, h, Q, L]
        scores = scores.masked_fill(pad[:, None, None, :], float("-inf"))
        out = (scores.softmax(-1) @ heads(v)).transpose(-3, -2).flatten(-2)         # [B, Q, D]
        return self.attn.out_proj(out)

    def forward(self, x: torch.Tensor, tgt_sizes: torch.Tensor | Sequence[Sequence[int]],
                temporal_ids: Sequence[Sequence[int]] | None = None) -> torch.Tensor:
        """x [B, L, kv_dim] (rows past h*w of each piece are padding), tgt_sizes [B, 2] = (h, w) patch grids ->
        [B, Q, D]; with `temporal_ids` (3D only; one list per group of pieces, -1 = still image) one output per
        group, the group's pieces attended together with their temporal embedding added to the keys."""
        sizes = [tuple(int(v) for v in s) for s in (tgt_sizes.tolist() if torch.is_tensor(tgt_sizes) else tgt_sizes)]
        assert len(sizes) == x.shape[0]
        lengths = [h * w for h, w in sizes]
        values = self.ln_kv(self.kv_proj(x.float()))                           # [B, L, D]
        pos = torch.zeros_like(values)
        pad = torch.ones(values.shape[:2], dtype=torch.bool)
        for i, ((h, w), n) in enumerate(zip(sizes, lengths)):
            pos[i, :n] = sincos_pos_embed_2d(self.embed_dim, h, w)
            pad[i, :n] = False
        keys = values + pos
        if temporal_ids is not None and not self.temporal:
            raise ValueError("temporal_ids need the 3D resampler")
        if temporal_ids is not None:
            flat = [t for group in temporal_ids for t in group]
            assert len(flat) == x.shape[0]
            for i, t in enumerate(flat):
                if t >= 0:
                    keys[i] = keys[i] + sincos_pos_embed_1d(self.embed_dim, torch.tensor([t]))[0]
            groups, start = [], 0
            for group in temporal_ids:
                groups.append(range(start, start + len(group)))
                start += len(group)
            width = max(sum(values.shape[1] for _ in g) for g in groups)
            gk = torch.zeros(len(groups), width, self.embed_dim)
            gv, gpad = torch.zeros_like(gk), torch.ones(len(groups), width, dtype=torch.bool)
            for j, g in enumerate(groups):  # piece-major concatenation of the group's patches
                cat_k, cat_v, cat_p = (torch.cat([t[i] for i in g]) for t in (keys, values, pad))
                gk[j, : len(cat_k)], gv[j, : len(cat_v)], gpad[j, : len(cat_p)] = cat_k, cat_v, cat_p
            keys, values, pad = gk, gv, gpad
        out = self._attend(keys, values, pad)
        return self.ln_post(out) @ self.proj


def resampler(folder: Path | str) -> Resampler:
    config = read_config(folder)
    return Resampler.from_state(load_state(folder, "resampler."), temporal=family_of(config).resampler == "3d")


def encode_image_reference(folder: Path | str, pixel_values: torch.Tensor,
                           position_grid: str = "published") -> torch.Tensor:
    """[3, H, W] normalized pixels of one image piece (H, W multiples of 14) -> [query_num, llm_hidden], as the
    published model computes it: ViT with the published position ids for the piece's grid (2.5: its 1 x L grid;
    `position_grid="tgt"` forces the (H/14, W/14) grid that vLLM and llama.cpp use for every family), then the
    resampler with tgt_sizes = (H/14, W/14) (3D families: temporal id -1, a still image)."""
    config = read_config(folder)
    patch = int(config["vision_config"].get("patch_size", 14))
    _, height, width = pixel_values.shape
    assert height % patch == 0 and width % patch == 0, (height, width)
    if position_grid not in ("published", "tgt"):
        raise ValueError(f"position_grid must be 'published' or 'tgt', not {position_grid!r}")
    grid_hw = (height // patch, width // patch)
    tower, module = _image_encoder(*_folder_key(folder))
    grid = None if position_grid == "published" else grid_hw
    with torch.no_grad():
        features = vision_features(tower, pixel_values, grid)
        temporal = [[-1]] if module.temporal else None
        return module(features, [grid_hw], temporal)[0]


def encode_video_reference(folder: Path | str, groups: Sequence[Sequence[torch.Tensor]],
                           temporal_ids: Sequence[Sequence[int]]) -> torch.Tensor:
    """Video frames as the published MiniCPM-V 4.5 encodes them -> [len(groups), query_num, llm_hidden]: each
    frame ([3, H, W] normalized pixels, one piece) through the ViT with its grid's published position ids, then
    the 3D resampler over all frames at once with `temporal_ids` (one list per group, as `chat(temporal_ids=)`),
    one output block per group."""
    config = read_config(folder)
    patch = int(config["vision_config"].get("patch_size", 14))
    frames = [frame for group in groups for frame in group]
    assert [len(g) for g in groups] == [len(t) for t in temporal_ids], (groups, temporal_ids)
    tower, module = _image_encoder(*_folder_key(folder))
    if not module.temporal:
        raise ValueError("temporal ids need the 3D resampler")
    with torch.no_grad():
        features = [vision_features(tower, frame)[0] for frame in frames]
        batch = nn.utils.rnn.pad_sequence(features, batch_first=True)
        sizes = [(f.shape[1] // patch, f.shape[2] // patch) for f in frames]
        return module(batch, sizes, [list(t) for t in temporal_ids])


def _folder_key(folder: Path | str) -> tuple[str, int]:
    folder = Path(folder).resolve()
    stamps = [p.stat().st_mtime_ns for p in (folder / "config.json", folder / "model.safetensors.index.json",
                                             folder / "model.safetensors") if p.exists()]
    return str(folder), hash(tuple(stamps))


@functools.lru_cache(maxsize=4)
def _image_encoder(folder: str, _stamp: int) -> tuple[nn.Module, Resampler]:
    """(vision tower, resampler) of a folder, loaded once per folder state (encode_image_reference is called
    per image piece)."""
    return vision_tower(folder), resampler(folder)


# --------------------------------------------------------------------------------------------------------------
# Language models
# --------------------------------------------------------------------------------------------------------------

def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x32 = x.float()
    return weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


class _RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(dim)), eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _rms_norm(x, self.weight, self.eps)


@dataclass
class MiniCPMConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_position_embeddings: int = 4096
    rope_scaling: dict[str, Any] | None = None
    scale_emb: float = 1.0
    scale_depth: float | None = None     # None: residual scale 1 (scale_depth = sqrt(num_layers))
    dim_model_base: float | None = None  # None: no logit scaling (dim_model_base = hidden_size)
    use_mup: bool = True
    tie_word_embeddings: bool = False
    attention_bias: bool = False

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "MiniCPMConfig":
        heads = int(d["num_attention_heads"])
        return cls(
            vocab_size=int(d["vocab_size"]), hidden_size=int(d["hidden_size"]),
            intermediate_size=int(d["intermediate_size"]), num_hidden_layers=int(d["num_hidden_layers"]),
            num_attention_heads=heads, num_key_value_heads=int(d.get("num_key_value_heads") or heads),
            head_dim=int(d.get("head_dim") or int(d["hidden_size"]) // heads),
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-5)), rope_theta=float(d.get("rope_theta", 10000.0)),
            max_position_embeddings=int(d.get("max_position_embeddings", 4096)), rope_scaling=d.get("rope_scaling"),
            scale_emb=float(d.get("scale_emb", 1.0)), scale_depth=d.get("scale_depth"),
            dim_model_base=d.get("dim_model_base"), use_mup=bool(d.get("use_mup", True)),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            attention_bias=bool(d.get("attention_bias", False)),
        )

    @property
    def residual_scale(self) -> float:
        if self.scale_depth is None or not self.use_mup:
            return 1.0
        return float(self.scale_depth) / math.sqrt(self.num_hidden_layers)

    @property
    def logit_divisor(self) -> float:
        return 1.0 if self.dim_model_base is None else self.hidden_size / float(self.dim_model_base)


class _Rotary:
    """cos/sin tables [T, head_dim] (halves duplicated, rotate-half convention). Default RoPE, or MiniCPM's LongRoPE:
    frequencies divided by the short (or long, iff max_pos > original max_pos) factors, cos and sin multiplied by
    sqrt(1 + log(max_pos / orig) / log(orig))."""

    def __init__(self, cfg: MiniCPMConfig) -> None:
        dim = cfg.head_dim
        inv_freq = 1.0 / cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim)
        self.scale = 1.0
        scaling = cfg.rope_scaling
        kind = None if scaling is None else scaling.get("rope_type", scaling.get("type"))
        if kind in (None, "default"):
            pass
        elif kind == "longrope":
            orig = int(scaling["original_max_position_embeddings"])
            factors = scaling["long_factor"] if cfg.max_position_embeddings > orig else scaling["short_factor"]
            inv_freq = inv_freq / torch.tensor(factors, dtype=torch.float32)
            self.scale = math.sqrt(1 + math.log(cfg.max_position_embeddings / orig) / math.log(orig))
        else:
            raise NotImplementedError(f"rope_scaling {kind!r}")
        self.inv_freq = inv_freq

    def __call__(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        angles = positions.float()[..., None] * self.inv_freq
        angles = torch.cat([angles, angles], dim=-1)
        return angles.cos() * self.scale, angles.sin() * self.scale


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=-1)
    return torch.cat([-b, a], dim=-1)


class _Attention(nn.Module):
    def __init__(self, cfg: MiniCPMConfig) -> None:
        super().__init__()
        self.cfg = cfg
        h, kv, hd, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.hidden_size
        self.q_proj = nn.Linear(d, h * hd, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(d, kv * hd, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(d, kv * hd, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(h * hd, d, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, cfg.num_attention_heads, cfg.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, cfg.num_key_value_heads, cfg.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, cfg.num_key_value_heads, cfg.head_dim).transpose(1, 2)
        q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
        group = cfg.num_attention_heads // cfg.num_key_value_heads  # GQA: head i reads kv head i // group
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        scores = q @ k.transpose(-1, -2) / math.sqrt(cfg.head_dim)
        causal = torch.ones(t, t, dtype=torch.bool).triu(1)
        probs = scores.masked_fill(causal, float("-inf")).softmax(-1)
        return self.o_proj((probs @ v).transpose(1, 2).reshape(b, t, -1))


class _MLP(nn.Module):
    def __init__(self, cfg: MiniCPMConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class _Layer(nn.Module):
    def __init__(self, cfg: MiniCPMConfig) -> None:
        super().__init__()
        self.input_layernorm = _RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = _Attention(cfg)
        self.post_attention_layernorm = _RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = _MLP(cfg)
        self.residual_scale = cfg.residual_scale

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin) * self.residual_scale
        return x + self.mlp(self.post_attention_layernorm(x)) * self.residual_scale


class _MiniCPMModel(nn.Module):
    def __init__(self, cfg: MiniCPMConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(_Layer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = _RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class MiniCPMForCausalLM(nn.Module):
    """Our MiniCPM decoder (HF names: model.embed_tokens, model.layers.N.{self_attn,mlp,...}, model.norm, lm_head).
    Called with input_ids, the embeddings are multiplied by scale_emb; called with inputs_embeds, they are used
    as given (as the published MiniCPM model does)."""

    def __init__(self, cfg: MiniCPMConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.model = _MiniCPMModel(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.rotary = _Rotary(cfg)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def forward(self, input_ids: torch.Tensor | None = None, inputs_embeds: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, **_: Any):  # noqa: ANN201
        from transformers.modeling_outputs import CausalLMOutputWithPast

        if inputs_embeds is None:
            inputs_embeds = self.model.embed_tokens(input_ids) * self.cfg.scale_emb
        h = inputs_embeds.float()
        if position_ids is None:
            position_ids = torch.arange(h.shape[1])[None]
        cos, sin = self.rotary(position_ids)
        cos, sin = cos[:, None], sin[:, None]  # broadcast over heads
        for layer in self.model.layers:
            h = layer(h, cos, sin)
        h = self.model.norm(h)
        return CausalLMOutputWithPast(logits=self.lm_head(h / self.cfg.logit_divisor))


def _hf_builder(config_name: str, model_name: str) -> Callable[[dict[str, Any]], nn.Module]:
    def build(llm_config: dict[str, Any]) -> nn.Module:
        import transformers

        config = getattr(transformers, config_name)(**llm_config)
        config._attn_implementation = "eager"
        return getattr(transformers, model_name)(config)

    return build


def _build_minicpm(llm_config: dict[str, Any]) -> nn.Module:
    return MiniCPMForCausalLM(MiniCPMConfig.from_dict(llm_config))


LLM_BUILDERS: dict[str, Callable[[dict[str, Any]], nn.Module]] = {
    "llama": _hf_builder("LlamaConfig", "LlamaForCausalLM"),
    "qwen2": _hf_builder("Qwen2Config", "Qwen2ForCausalLM"),
    "qwen3": _hf_builder("Qwen3Config", "Qwen3ForCausalLM"),
    "minicpm": _build_minicpm,
}


def language_model(folder: Path | str) -> nn.Module:
    """The reference LLM with the llm.* weights, fp32, eval; `model(input_ids=...)` or `model(inputs_embeds=...)`
    -> `.logits`. The config.json it was built from is attached as `model.reference_config`."""
    config = read_config(folder)
    llm_config = {k: v for k, v in config.items() if k not in _NON_LLM_KEYS}
    model = LLM_BUILDERS[llm_kind(config)](llm_config)
    state = load_state(folder, "llm.")
    if "lm_head.weight" not in state and config.get("tie_word_embeddings"):
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if "rotary_emb" not in k]
    if missing or unexpected:
        raise ValueError(f"llm.* does not fit {type(model).__name__}: missing {missing}, unexpected {unexpected}")
    model = model.float().eval()
    model.reference_config = config
    return model


def image_bounds(input_ids: Sequence[int] | torch.Tensor, start_ids: Sequence[int],
                 end_ids: Sequence[int]) -> list[tuple[int, int]]:
    """Published image_bound: the spans strictly between each start token (<image>, <slice>) and the next end
    token (</image>, </slice>)."""
    ids = torch.as_tensor(input_ids).reshape(-1)
    starts = (torch.isin(ids, torch.tensor(list(start_ids))).nonzero().reshape(-1) + 1).tolist()
    ends = torch.isin(ids, torch.tensor(list(end_ids))).nonzero().reshape(-1).tolist()
    assert len(starts) == len(ends), (starts, ends)
    return list(zip(starts, ends))


def llm_input_embeddings(model: nn.Module, input_ids: Sequence[int] | torch.Tensor,
                         image_embeds: Sequence[torch.Tensor] | torch.Tensor = (),
                         bounds: Sequence[tuple[int, int]] = ()) -> torch.Tensor:
    """The published get_vllm_embedding for one sequence -> [1, T, hidden]: token embeddings (x scale_emb iff the
    checkpoint's config.json has `scale_emb`), then the image pieces' embeddings written unscaled over the spans
    `bounds` (piece i fills bounds[i]; see `image_bounds`). Feed the result as `model(inputs_embeds=...)`."""
    ids = torch.as_tensor(input_ids).reshape(1, -1)
    embeds = model.get_input_embeddings()(ids).float()
    scale_emb = getattr(model, "reference_config", {}).get("scale_emb")
    if scale_emb is not None:
        embeds = embeds * float(scale_emb)
    if len(bounds):
        index = torch.cat([torch.arange(s, e) for s, e in bounds])
        feats = torch.cat([e.reshape(-1, embeds.shape[-1]) for e in image_embeds]).float()
        assert len(index) == len(feats), (len(index), len(feats))
        embeds = embeds.clone()
        embeds[0, index] = feats
    return embeds


# --------------------------------------------------------------------------------------------------------------
# Pixels
# --------------------------------------------------------------------------------------------------------------

def preprocess_448(image: Image.Image, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """A 448x448 image -> [3, 448, 448] float32 (x/255 - mean)/std, no resize (published processor arithmetic)."""
    image = image.convert("RGB")
    if image.size != (448, 448):
        raise ValueError(f"preprocess_448 wants a 448x448 image, got {image.size}")
    x = np.asarray(image, dtype=np.float32) / np.float32(255)
    x = (x - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)
    return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))
