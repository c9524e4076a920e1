"""Tests for the synthetic MiniCPM-V checkpoint factory (tiny checkpoints only; full size is planned, not written).

Parametrized over `fam`, not `family`: conftest.py auto-parametrizes any `family` argument."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import pytest

from minicpmv_edge.families import families, get
from minicpmv_edge.synthetic import make_checkpoint, plan_tensors, synthetic_keys

# The registry's resampler families (4.6: test_synthetic_minicpmv4_6.py).
RESAMPLER = [f.key for f in families() if f.projector == "resampler"]
MULTILINGUAL = "Hello, world! 你好，世界。こんにちは 12345 3.14 😀🚀 def f(x):\n\treturn x * 2  # Größe"
MESSAGES = [{"role": "user", "content": "What is in the image?"}, {"role": "assistant", "content": "A cat."},
            {"role": "user", "content": "什么颜色？"}]


def _omni(fam: str) -> bool:
    return get(fam).synthetic.audio


def _llm_model_type(fam: str) -> str:
    """The standard transformers class (model_type) the family's `llm.*` tensors must load into: its reference."""
    return get(fam).reference.llm


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("synthetic")
    return {f: make_checkpoint(f, root / f) for f in RESAMPLER}


def _read_header(path: Path) -> dict:
    with open(path, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        return json.loads(fh.read(n))


def _config(ckpt: Path) -> dict:
    return json.loads((ckpt / "config.json").read_text())


def test_families_and_unknown_family(tmp_path: Path) -> None:
    assert len(RESAMPLER) == 6 and "minicpm-v-4.5" in RESAMPLER
    assert set(RESAMPLER) < set(synthetic_keys())
    with pytest.raises(ValueError, match="minicpm-v-2.6"):
        make_checkpoint("minicpm-v-9.9", tmp_path / "x")
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("fam", RESAMPLER)
def test_file_set_and_index(checkpoints: dict[str, Path], fam: str) -> None:
    ckpt = checkpoints[fam]
    names = {p.name for p in ckpt.iterdir()}
    required = {"config.json", "generation_config.json", "preprocessor_config.json", "tokenizer.json",
                "tokenizer_config.json", "special_tokens_map.json", "model.safetensors.index.json",
                "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"}
    assert required <= names
    assert ("tokenizer.model" in names) == (fam == "minicpm-v-4.0")
    assert not any(n.startswith(".") or n.endswith(".tmp") for n in names)

    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    weight_map = index["weight_map"]
    seen: dict[str, str] = {}
    total = 0
    for shard in sorted(set(weight_map.values())):
        header = _read_header(ckpt / shard)
        header.pop("__metadata__")
        for name, info in header.items():
            assert info["dtype"] == "BF16", name
            total += info["data_offsets"][1] - info["data_offsets"][0]
            seen[name] = shard
    assert seen == weight_map                       # every tensor indexed, pointing at its real shard
    assert index["metadata"]["total_size"] == total
    planned = plan_tensors(fam, "tiny")
    assert [n for n, _ in planned] == list(weight_map)
    assert sum(math.prod(s) for _, s in planned) * 2 == total


@pytest.mark.parametrize("fam", RESAMPLER)
def test_config_and_tensor_names(checkpoints: dict[str, Path], fam: str) -> None:
    ckpt = checkpoints[fam]
    cfg = _config(ckpt)
    assert cfg["architectures"] == (["MiniCPMO"] if _omni(fam) else ["MiniCPMV"])
    for key in ("model_type", "query_num", "image_size", "patch_size", "slice_config", "slice_mode",
                "batch_vision_input", "drop_vision_last_layer", "vision_config", "auto_map", "torch_dtype",
                "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "intermediate_size", "rope_theta", "rms_norm_eps", "max_position_embeddings",
                "tie_word_embeddings", "bos_token_id", "eos_token_id", "vocab_size"):
        assert key in cfg, key
    assert cfg["torch_dtype"] == "bfloat16"
    assert cfg["query_num"] == (96 if fam == "minicpm-llama3-v-2.5" else 64)
    assert cfg["hidden_size"] % 128 == 0                          # llama.cpp: resampler head size 128
    assert (cfg["vision_config"]["image_size"], cfg["vision_config"]["patch_size"]) == (980, 14)
    assert ("version" in cfg) == (fam != "minicpm-llama3-v-2.5")
    pre = json.loads((ckpt / "preprocessor_config.json").read_text())
    assert pre["image_feature_size"] == cfg["query_num"] and pre["norm_mean"] == [0.5, 0.5, 0.5]

    shapes = dict(plan_tensors(fam, "tiny"))
    prefixes = {n.split(".")[0] for n in shapes}
    assert {"llm", "vpm", "resampler"} <= prefixes
    assert ({"apm", "tts", "audio_projection_layer"} <= prefixes) == _omni(fam)
    h, vh = cfg["hidden_size"], cfg["vision_config"]["hidden_size"]
    assert shapes["vpm.embeddings.position_embedding.weight"] == (4900, vh)
    assert shapes["vpm.embeddings.patch_embedding.weight"] == (vh, 3, 14, 14)
    assert shapes["resampler.query"] == (cfg["query_num"], h)
    assert shapes["resampler.kv_proj.weight"] == (h, vh) and "resampler.kv_proj.bias" not in shapes
    assert shapes["resampler.attn.in_proj_weight"] == (3 * h, h)
    assert shapes["llm.model.embed_tokens.weight"] == (cfg["vocab_size"], h)
    assert ("llm.lm_head.weight" in shapes) != cfg["tie_word_embeddings"]
    if fam == "minicpm-v-4.0":
        rope = cfg["rope_scaling"]
        assert rope["rope_type"] == "longrope" and len(rope["long_factor"]) == cfg["head_dim"] // 2
        assert "scale_emb" not in cfg                                  # Llama-form LLM (PUBLISHED.md)
        assert cfg["head_dim"] * cfg["num_attention_heads"] != cfg["hidden_size"]   # published quirk kept


@pytest.mark.parametrize("fam", RESAMPLER)
def test_tokenizer_roundtrip_and_chat_template(checkpoints: dict[str, Path], fam: str) -> None:
    transformers = pytest.importorskip("transformers")
    ckpt = checkpoints[fam]
    # trust_remote_code=False: the published config.json auto_map would otherwise make transformers
    # ask interactively. transformers 5.23 cannot build the generic fallback config from 4.0's
    # (published) longrope rope_scaling, so that family gets an explicit placeholder config.
    extra = {"config": transformers.PretrainedConfig()} if fam == "minicpm-v-4.0" else {}
    tok = transformers.AutoTokenizer.from_pretrained(ckpt, trust_remote_code=False, **extra)
    cfg = _config(ckpt)
    assert len(tok) <= cfg["vocab_size"] and cfg["vocab_size"] % 64 == 0
    assert 1000 <= len(tok) <= 3000
    ids = tok.encode(MULTILINGUAL, add_special_tokens=False)
    assert tok.decode(ids) == MULTILINGUAL
    for special in ("<image>", "</image>", "<slice>", "</slice>", "<unk>"):
        assert tok.convert_tokens_to_ids(special) not in (None, tok.unk_token_id) or special == "<unk>"
        assert tok.encode(special, add_special_tokens=False) == [tok.convert_tokens_to_ids(special)]
    prompt = tok.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert "什么颜色？" in prompt
    eos = cfg["eos_token_id"] if isinstance(cfg["eos_token_id"], list) else [cfg["eos_token_id"]]
    assert any(tok.convert_ids_to_tokens(i) in prompt for i in eos) or fam == "minicpm-llama3-v-2.5"
    if "qwen3" == _llm_model_type(fam):                            # thinking switch of the 4.5 template
        off = tok.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True, enable_thinking=False)
        assert off.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert tok.apply_chat_template(MESSAGES, tokenize=True, add_generation_prompt=True)


@pytest.mark.parametrize("fam", RESAMPLER)
def test_llm_and_vision_load_into_transformers_classes(checkpoints: dict[str, Path], fam: str) -> None:
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from safetensors.torch import load_file
    from transformers.models.idefics2.modeling_idefics2 import Idefics2VisionTransformer

    ckpt = checkpoints[fam]
    cfg = _config(ckpt)
    state: dict = {}
    for shard in sorted(ckpt.glob("model-*.safetensors")):
        state.update(load_file(shard))
    nested = ("vision_config", "slice_config", "auto_map", "architectures", "model_type", "audio_config", "tts_config")
    llm_cfg = transformers.AutoConfig.for_model(_llm_model_type(fam), **{k: v for k, v in cfg.items() if k not in nested})
    llm = transformers.AutoModelForCausalLM.from_config(llm_cfg, dtype=torch.bfloat16)
    llm.load_state_dict({k[4:]: v for k, v in state.items() if k.startswith("llm.")}, strict=True)
    logits = llm(input_ids=torch.tensor([[1, 2, 3, 4]])).logits.float()
    assert torch.isfinite(logits).all() and 0.01 < logits.std() < 10

    vision_cfg = {k: v for k, v in cfg["vision_config"].items() if k != "model_type"}
    vision = Idefics2VisionTransformer(transformers.Idefics2VisionConfig(**vision_cfg))
    vision.load_state_dict({k[4:]: v.float() for k, v in state.items() if k.startswith("vpm.")}, strict=True)
    attn = torch.nn.MultiheadAttention(cfg["hidden_size"], cfg["hidden_size"] // 128)
    attn.load_state_dict({k[15:]: v.float() for k, v in state.items() if k.startswith("resampler.attn.")}, strict=True)


def test_deterministic_and_atomic_replace(tmp_path: Path) -> None:
    a = make_checkpoint("minicpm-v-2.6", tmp_path / "a", seed=3)
    b = make_checkpoint("minicpm-v-2.6", tmp_path / "b", seed=3)
    for f in a.iterdir():
        assert f.read_bytes() == (b / f.name).read_bytes(), f.name
    (a / "stale.txt").write_text("old")
    again = make_checkpoint("minicpm-v-2.6", a, seed=4)                # replaces the folder wholesale
    assert again == a and not (a / "stale.txt").exists()
    assert (a / "model-00001-of-00002.safetensors").read_bytes() != (b / "model-00001-of-00002.safetensors").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]  # no temp folders left behind


def test_full_size_plan_matches_published_parameter_count() -> None:
    # MiniCPM-V 4.5's published model.safetensors.index.json: total_size 17391790560 bytes of bf16.
    plan = plan_tensors("minicpm-v-4.5", "full")
    assert sum(math.prod(s) for _, s in plan) * 2 == 17_391_790_560
    shapes = dict(plan)
    assert shapes["llm.model.embed_tokens.weight"] == (151748, 4096)
    assert shapes["llm.model.layers.35.self_attn.q_norm.weight"] == (128,)
    assert shapes["vpm.encoder.layers.26.mlp.fc1.weight"] == (4304, 1152)
    assert shapes["resampler.attn.in_proj_weight"] == (3 * 4096, 4096)
    for family in RESAMPLER:                                          # every full plan is well formed
        assert sum(math.prod(s) for _, s in plan_tensors(family, "full")) > 3.5e9
