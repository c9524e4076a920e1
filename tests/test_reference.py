"""Self-checks of tests/reference.py on small random weights (no synthetic factory, no llama.cpp).

1. Resampler against torch.nn.MultiheadAttention driven directly, and its 2D sin-cos table against a numpy
   rendition of the published get_2d_sincos_pos_embed (plus the 3D variant's temporal path).
2. Our MiniCPM decoder against transformers' LlamaForCausalLM: identical when every MiniCPM scaling is the
   identity; with real scalings against Llama carrying equivalently rescaled weights; LongRoPE both ways.
3. The vision tower's position ids (non-square grids) against the published bucketize formula; the published
   [3, 14, L*14] strip input equals the 2D image; 2.5's 1 x L grid; the sharded reader; encode_image_reference's
   plumbing.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from transformers import Idefics2VisionConfig, LlamaConfig, LlamaForCausalLM
from transformers.models.idefics2.modeling_idefics2 import Idefics2VisionTransformer

import reference as R

torch.set_grad_enabled(False)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: one intra-op thread is faster than two contending ones (restored afterwards)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

D, KV_DIM, QUERIES = 256, 128, 64  # resampler: 2 heads of 128 (published head size)


# ---------------------------------------------------------------------------------------------- helpers

def numpy_2d_sincos(embed_dim: int, h: int, w: int) -> np.ndarray:
    """The published get_2d_sincos_pos_embed, float64: meshgrid(w, h) stacked; the first half of the channels from
    grid[0] (the w coordinate), the second from grid[1]; each half [sin(p*omega), cos(p*omega)],
    omega = 1 / 10000 ** (arange(D/4) / (D/4))."""
    grid = np.stack(np.meshgrid(np.arange(w, dtype=np.float64), np.arange(h, dtype=np.float64)), axis=0)

    def one_d(dim: int, pos: np.ndarray) -> np.ndarray:
        omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
        out = np.einsum("hw,d->hwd", pos, omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=-1)

    return np.concatenate([one_d(embed_dim // 2, grid[0]), one_d(embed_dim // 2, grid[1])], axis=-1)


def numpy_temporal(embed_dim: int, t: int) -> np.ndarray:
    omega = 1.0 / 10000 ** (np.arange(embed_dim // 2, dtype=np.float64) / (embed_dim / 2.0))
    return np.concatenate([np.sin(t * omega), np.cos(t * omega)])


def random_resampler_state(seed: int, kv_dim: int = KV_DIM) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * scale

    state = {"query": rnd(QUERIES, D), "kv_proj.weight": rnd(D, kv_dim, scale=kv_dim ** -0.5),
             "attn.in_proj_weight": rnd(3 * D, D, scale=D ** -0.5), "attn.in_proj_bias": rnd(3 * D, scale=0.1),
             "attn.out_proj.weight": rnd(D, D, scale=D ** -0.5), "attn.out_proj.bias": rnd(D, scale=0.1),
             "proj": rnd(D, D, scale=D ** -0.5)}
    for ln in ("ln_q", "ln_kv", "ln_post"):
        state[f"{ln}.weight"] = 1 + rnd(D, scale=0.1)
        state[f"{ln}.bias"] = rnd(D, scale=0.1)
    return state


def independent_resampler(state: dict[str, torch.Tensor], pieces: list[tuple[torch.Tensor, int, int, int | None]]
                          ) -> torch.Tensor:
    """torch.nn.MultiheadAttention over the concatenated pieces [(x [h*w, kv], h, w, temporal id or None)]:
    keys = ln_kv(kv_proj x) + 2D sin-cos (+ temporal sin-cos), values = ln_kv(kv_proj x); -> [Q, D]."""
    mha = torch.nn.MultiheadAttention(D, D // 128)
    mha.in_proj_weight.copy_(state["attn.in_proj_weight"])
    mha.in_proj_bias.copy_(state["attn.in_proj_bias"])
    mha.out_proj.weight.copy_(state["attn.out_proj.weight"])
    mha.out_proj.bias.copy_(state["attn.out_proj.bias"])

    def ln(t: torch.Tensor, name: str) -> torch.Tensor:
        return F.layer_norm(t, (D,), state[f"{name}.weight"], state[f"{name}.bias"], 1e-6)

    keys, values = [], []
    for x, h, w, t in pieces:
        v = ln(x @ state["kv_proj.weight"].T, "ln_kv")
        k = v + torch.from_numpy(numpy_2d_sincos(D, h, w).reshape(h * w, D)).float()
        if t is not None and t >= 0:
            k = k + torch.from_numpy(numpy_temporal(D, t)).float()
        keys.append(k)
        values.append(v)
    q = ln(state["query"], "ln_q")
    out = mha(q[:, None], torch.cat(keys)[:, None], torch.cat(values)[:, None], need_weights=False)[0][:, 0]
    return ln(out, "ln_post") @ state["proj"]


# ---------------------------------------------------------------------------------------------- 1. resampler

@pytest.mark.parametrize("grid", [(32, 32), (20, 38)])
def test_sincos_table_matches_published_formula(grid: tuple[int, int]) -> None:
    h, w = grid
    ours = R.sincos_pos_embed_2d(D, h, w).numpy()
    assert ours.shape == (h * w, D)
    np.testing.assert_allclose(ours, numpy_2d_sincos(D, h, w).reshape(h * w, D), atol=1e-5, rtol=0)
    # channel layout: column index first, row index second (the table is not symmetric in h and w)
    assert not np.allclose(ours[1], ours[w])


@pytest.mark.parametrize("grid", [(32, 32), (20, 38)])
def test_resampler_matches_multihead_attention(grid: tuple[int, int]) -> None:
    h, w = grid
    state = random_resampler_state(0)
    x = torch.randn(h * w, KV_DIM, generator=torch.Generator().manual_seed(1))
    module = R.Resampler.from_state(state)
    assert module.num_heads == 2
    ours = module(x[None], [(h, w)])[0]
    ref = independent_resampler(state, [(x, h, w, None)])
    assert ours.shape == (QUERIES, D)
    torch.testing.assert_close(ours, ref, atol=2e-5, rtol=1e-5)


def test_resampler_batch_with_padding_equals_single_pieces() -> None:
    state = random_resampler_state(2)
    module = R.Resampler.from_state(state)
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(32 * 32, KV_DIM, generator=g), torch.randn(20 * 38, KV_DIM, generator=g)
    batch = torch.zeros(2, 32 * 32, KV_DIM)
    batch[0], batch[1, : len(b)] = a, b
    batch[1, len(b):] = 1e3  # padding must not leak in
    out = module(batch, torch.tensor([[32, 32], [20, 38]]))
    torch.testing.assert_close(out[0], module(a[None], [(32, 32)])[0], atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(out[1], module(b[None], [(20, 38)])[0], atol=2e-5, rtol=1e-5)


def test_3d_resampler_still_image_and_frame_group() -> None:
    state = random_resampler_state(4)
    flat, temporal = R.Resampler.from_state(state), R.Resampler.from_state(state, temporal=True)
    g = torch.Generator().manual_seed(5)
    a, b = torch.randn(20 * 38, KV_DIM, generator=g), torch.randn(20 * 38, KV_DIM, generator=g)
    # a still image (temporal id -1) is exactly the 2D resampler
    torch.testing.assert_close(temporal(a[None], [(20, 38)], [[-1]]), flat(a[None], [(20, 38)]), atol=0, rtol=0)
    # two frames with temporal ids 0 and 5 attended together: one output for the group
    out = temporal(torch.stack([a, b]), [(20, 38), (20, 38)], [[0, 5]])
    assert out.shape == (1, QUERIES, D)
    ref = independent_resampler(state, [(a, 20, 38, 0), (b, 20, 38, 5)])
    torch.testing.assert_close(out[0], ref, atol=2e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------- 2. MiniCPM LLM

HIDDEN, LAYERS, VOCAB = 256, 3, 300


def random_llama(seed: int, head_dim: int = 64, rope_scaling: dict | None = None, max_pos: int = 4096
                 ) -> tuple[LlamaForCausalLM, dict]:
    llm_config = dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=512, num_hidden_layers=LAYERS,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=head_dim, rms_norm_eps=1e-6,
                      rope_theta=10000.0, max_position_embeddings=max_pos, rope_scaling=rope_scaling,
                      tie_word_embeddings=False)
    config = LlamaConfig(**llm_config)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    llama = LlamaForCausalLM(config).eval()
    g = torch.Generator().manual_seed(seed)
    for name, p in llama.named_parameters():
        if "norm" in name:
            p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
        elif "embed_tokens" in name:
            p.copy_(torch.randn(p.shape, generator=g))
        else:
            p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[-1]))
    return llama, llm_config


def minicpm(llm_config: dict, state: dict, **scales: float) -> R.MiniCPMForCausalLM:
    model = R.MiniCPMForCausalLM(R.MiniCPMConfig.from_dict({**llm_config, **scales}))
    state = dict(state)
    if model.cfg.tie_word_embeddings:
        state.pop("lm_head.weight")
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    model.load_state_dict(state, strict=True)
    return model.eval()


def ids(n: int = 24, seed: int = 6) -> torch.Tensor:
    return torch.randint(0, VOCAB, (1, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("head_dim", [64, 128])  # 128: heads x head_dim != hidden, as in MiniCPM-V 4.0
def test_minicpm_identity_scalings_equal_llama(head_dim: int) -> None:
    llama, cfg = random_llama(0, head_dim)
    ours = minicpm(cfg, llama.state_dict(), scale_emb=1.0, scale_depth=math.sqrt(LAYERS), dim_model_base=HIDDEN)
    assert ours.cfg.residual_scale == pytest.approx(1.0) and ours.cfg.logit_divisor == 1.0
    a, b = ours(input_ids=ids()).logits, llama(input_ids=ids()).logits
    assert a.abs().max() > 1.0  # a meaningful scale for the tolerance
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


@pytest.mark.parametrize("tied", [False, True])
def test_minicpm_scalings_equal_rescaled_llama(tied: bool) -> None:
    scale_emb, scale_depth, base = 12.0, 1.4, 64
    llama, cfg = random_llama(1)
    minicpm_state = {k: v.clone() for k, v in llama.state_dict().items()}
    ours = minicpm({**cfg, "tie_word_embeddings": tied}, minicpm_state,
                   scale_emb=scale_emb, scale_depth=scale_depth, dim_model_base=base)
    # Llama computing the same function: embeddings x scale_emb, each residual branch's output projection x
    # scale_depth / sqrt(L), lm_head / (hidden / dim_model_base) (from the embeddings when tied)
    residual = scale_depth / math.sqrt(LAYERS)
    folded = {}
    for name, w in minicpm_state.items():
        if name == "model.embed_tokens.weight":
            w = w * scale_emb
        elif name.endswith(("o_proj.weight", "down_proj.weight")):
            w = w * residual
        elif name == "lm_head.weight":
            w = (minicpm_state["model.embed_tokens.weight"] if tied else w) / (HIDDEN / base)
        folded[name] = w
    llama.load_state_dict(folded, strict=True)
    a, b = ours(input_ids=ids()).logits, llama(input_ids=ids()).logits
    assert not torch.allclose(a, minicpm(cfg, minicpm_state)(input_ids=ids()).logits, atol=1e-2)
    torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("orig,max_pos", [(32, 32), (16, 64)])
def test_minicpm_longrope_equals_llama_longrope(orig: int, max_pos: int) -> None:
    # (32, 32): the MiniCPM-V 4.0 situation (short factors, attention factor 1) with a 24-token prompt;
    # (16, 64): long factors and attention factor sqrt(1 + ln 4 / ln 16) on both sides (prompt longer than 16).
    short = [1.0 + 0.3 * i for i in range(32)]
    long = [2.0 + 0.7 * i for i in range(32)]
    rope = {"rope_type": "longrope", "short_factor": short, "long_factor": long,
            "original_max_position_embeddings": orig}
    llama, cfg = random_llama(2, rope_scaling=rope, max_pos=max_pos)
    ours = minicpm(cfg, llama.state_dict())
    expected = 1.0 if max_pos == orig else math.sqrt(1 + math.log(max_pos / orig) / math.log(orig))
    assert ours.rotary.scale == pytest.approx(expected)
    torch.testing.assert_close(ours(input_ids=ids()).logits, llama(input_ids=ids()).logits, atol=1e-5, rtol=0)
    plain, _ = random_llama(2, max_pos=max_pos)  # the factors matter
    assert not torch.allclose(ours(input_ids=ids()).logits, plain(input_ids=ids()).logits, atol=1e-2)


def test_input_embeddings_scale_text_not_images() -> None:
    llama, cfg = random_llama(3)
    ours = minicpm(cfg, llama.state_dict(), scale_emb=12.0, scale_depth=1.4, dim_model_base=64)
    ours.reference_config = {"scale_emb": 12.0}
    tokens = ids()
    # text only: the spliced path equals the model's own input_ids path
    torch.testing.assert_close(ours(inputs_embeds=R.llm_input_embeddings(ours, tokens)).logits,
                               ours(input_ids=tokens).logits, atol=1e-5, rtol=0)
    # two image pieces of 3 rows between start (7) and end (8) tokens
    seq = torch.tensor([1, 7, 0, 0, 0, 8, 2, 7, 0, 0, 0, 8, 3])
    bounds = R.image_bounds(seq, [7], [8])
    assert bounds == [(2, 5), (8, 11)]
    pieces = [torch.randn(3, HIDDEN), torch.randn(3, HIDDEN)]
    emb = R.llm_input_embeddings(ours, seq, pieces, bounds)[0]
    torch.testing.assert_close(emb[2:5], pieces[0])
    torch.testing.assert_close(emb[8:11], pieces[1])
    torch.testing.assert_close(emb[6], ours.model.embed_tokens.weight[2] * 12.0)


def test_llm_table() -> None:
    base = {"architectures": ["MiniCPMV"]}
    assert R.llm_kind(base) == "llama"  # no version: 2.5
    assert R.llm_kind({**base, "version": 2.6}) == "qwen2"
    assert R.llm_kind({"architectures": ["MiniCPMO"], "version": 2.6}) == "qwen2"
    assert R.llm_kind({**base, "version": 4.0}) == "llama"
    assert R.llm_kind({**base, "version": 4.0, "scale_emb": 12}) == "minicpm"
    assert R.llm_kind({**base, "version": "4.5"}) == "qwen3"
    assert R.family_of({**base, "version": 4.5}).resampler == "3d"
    assert R.family_of({"architectures": ["MiniCPMO"], "version": 4.5}).resampler == "2d"


# ---------------------------------------------------------------------------------------------- 3. vision tower

VISION = {"hidden_size": 32, "image_size": 980, "intermediate_size": 64, "model_type": "siglip",
          "num_attention_heads": 2, "num_hidden_layers": 2, "patch_size": 14}


def write_folder(folder: Path, config: dict, tensors: dict[str, torch.Tensor]) -> Path:
    """config.json + two safetensors shards + model.safetensors.index.json."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    weight_map = {}
    for shard, keys in shards.items():
        save_file({k: tensors[k].to(torch.bfloat16).contiguous() for k in keys}, folder / shard)
        weight_map.update({k: shard for k in keys})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


@pytest.fixture(scope="module")
def vision_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(7)
    tower = Idefics2VisionTransformer(Idefics2VisionConfig(**{k: v for k, v in VISION.items() if k != "model_type"}))
    g = torch.Generator().manual_seed(7)
    state = {}
    for name, p in tower.state_dict().items():
        state[f"vpm.{name}"] = p + 0.05 * torch.randn(p.shape, generator=g)  # non-trivial norms and biases
    return state


def folder_for(tmp_path: Path, vision_state: dict, version: float | None, **extra: object) -> Path:
    config = {"architectures": ["MiniCPMV"], "drop_vision_last_layer": False, "vision_config": VISION,
              "query_num": QUERIES, "hidden_size": D, **extra}
    if version is not None:
        config["version"] = version
    tensors = dict(vision_state)
    tensors.update({f"resampler.{k}": v for k, v in random_resampler_state(8, kv_dim=VISION["hidden_size"]).items()})
    return write_folder(tmp_path / f"v{version}", config, tensors)


def published_ids(grid_h: int, grid_w: int, n: int = 70) -> torch.Tensor:
    """The published navit-siglip embedding position ids, written out as in modeling_navit_siglip.py."""
    tgt = torch.tensor([grid_h, grid_w], dtype=torch.int32)
    boundaries = torch.arange(1 / n, 1.0, 1 / n)
    coords_h = torch.arange(0, 1 - 1e-6, 1 / tgt[0])
    coords_w = torch.arange(0, 1 - 1e-6, 1 / tgt[1])
    bucket_h = torch.bucketize(coords_h, boundaries, right=True)
    bucket_w = torch.bucketize(coords_w, boundaries, right=True)
    return (bucket_h[:, None] * n + bucket_w).flatten()


def captured_ids(tower: torch.nn.Module, pixels: torch.Tensor, grid: tuple[int, int] | None = None) -> torch.Tensor:
    seen = []
    hook = tower.embeddings.position_embedding.register_forward_hook(lambda m, inp, out: seen.append(inp[0]))
    try:
        R.vision_features(tower, pixels, grid)
    finally:
        hook.remove()
    return seen[0][0]


def test_load_state_reads_all_shards(tmp_path: Path, vision_state: dict) -> None:
    folder = folder_for(tmp_path, vision_state, 2.6)
    state = R.load_state(folder, "vpm.")
    assert set(state) == {k[len("vpm."):] for k in vision_state}
    assert all(t.dtype == torch.float32 for t in state.values())
    name = "embeddings.position_embedding.weight"
    torch.testing.assert_close(state[name], vision_state[f"vpm.{name}"].to(torch.bfloat16).float())
    assert set(R.load_state(folder, "resampler.")) == set(random_resampler_state(0))


@pytest.mark.parametrize("grid", [(20, 38), (49, 58), (32, 32)])
def test_vision_tower_position_ids_match_published_formula(tmp_path: Path, vision_state: dict,
                                                           grid: tuple[int, int]) -> None:
    # (49, 58): grids where transformers 5.x's own Idefics2 arithmetic (index * step) and llama.cpp's
    # floor(70 * i / n) land in other buckets than the published arange/bucketize
    tower = R.vision_tower(folder_for(tmp_path, vision_state, 2.6))
    assert type(tower).__name__ == "Idefics2VisionTransformer" and len(tower.encoder.layers) == 2
    h, w = grid
    pixels = torch.randn(3, h * 14, w * 14, generator=torch.Generator().manual_seed(9))
    got = captured_ids(tower, pixels)
    assert torch.equal(got, published_ids(h, w))
    assert torch.equal(R.published_position_ids(h, w, 70), published_ids(h, w))


def test_strip_input_equals_image_and_flat_grid_of_2_5(tmp_path: Path, vision_state: dict) -> None:
    h, w = 20, 38
    image = torch.randn(3, h * 14, w * 14, generator=torch.Generator().manual_seed(10))
    # the published processor's reshape_by_patch: unfold into 14x14 patches, laid side by side in one strip
    patches = F.unfold(image[None], (14, 14), stride=(14, 14))              # [1, 3*14*14, h*w]
    strip = patches.reshape(3, 14, 14, h * w).permute(0, 1, 3, 2).reshape(3, 14, h * w * 14)
    tower = R.vision_tower(folder_for(tmp_path, vision_state, 2.6))
    torch.testing.assert_close(R.vision_features(tower, strip, (h, w)), R.vision_features(tower, image),
                               atol=1e-5, rtol=1e-5)
    # MiniCPM-Llama3-V 2.5 (no version key): the tower sees a [1, L] patch mask, so the grid is 1 x (h*w)
    tower_25 = R.vision_tower(folder_for(tmp_path, vision_state, None))
    assert torch.equal(captured_ids(tower_25, image), published_ids(1, h * w))
    assert torch.equal(captured_ids(tower_25, image, (h, w)), published_ids(h, w))


def test_drop_vision_last_layer(tmp_path: Path, vision_state: dict) -> None:
    folder = folder_for(tmp_path, vision_state, 2.6, drop_vision_last_layer=True)
    assert len(R.vision_tower(folder).encoder.layers) == VISION["num_hidden_layers"] - 1


@pytest.mark.parametrize("version", [2.6, 4.5])
def test_encode_image_reference_plumbing(tmp_path: Path, vision_state: dict, version: float) -> None:
    folder = folder_for(tmp_path, vision_state, version)
    h, w = 20, 38
    pixels = torch.randn(3, h * 14, w * 14, generator=torch.Generator().manual_seed(11))
    ours = R.encode_image_reference(folder, pixels)
    features = R.vision_features(R.vision_tower(folder), pixels)[0]
    state = R.load_state(folder, "resampler.")
    ref = independent_resampler(state, [(features, h, w, None)])
    assert ours.shape == (QUERIES, D)
    torch.testing.assert_close(ours, ref, atol=2e-5, rtol=1e-5)


def test_preprocess_448() -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (448, 448, 3), dtype=np.uint8)
    x = R.preprocess_448(Image.fromarray(pixels), [0.5, 0.4, 0.3], [0.5, 0.25, 0.2])
    assert x.shape == (3, 448, 448) and x.dtype == torch.float32
    expected = (pixels[5, 7] / 255.0 - np.array([0.5, 0.4, 0.3])) / np.array([0.5, 0.25, 0.2])
    np.testing.assert_allclose(x[:, 5, 7].numpy(), expected, atol=1e-6)
    with pytest.raises(ValueError):
        R.preprocess_448(Image.fromarray(pixels[:300]), [0.5] * 3, [0.5] * 3)
