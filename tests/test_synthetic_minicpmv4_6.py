"""Tests for the MiniCPM-V 4.6 / 4.6-Thinking synthetic checkpoints (tiny only; built by transformers).

Parametrized over `fam`, not `family`: conftest.py auto-parametrizes any `family` argument."""

from __future__ import annotations

import ast
import json
import struct
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from minicpmv_edge.families import families, get
from minicpmv_edge.synthetic import build_tokenizer, checkpoint_spec, make_checkpoint, synthetic_keys
from minicpmv_edge.synthetic import minicpmv4_6 as m46
from minicpmv_edge.synthetic.tokenizer import QWEN35_SPLIT

# The synthetic keys of the registry's 4.6 family: itself and its 4.6-Thinking variant.
VARIANTS = [k for k in synthetic_keys() if checkpoint_spec(k)[0].key == "minicpm-v-4.6"]
NAMED_TOKENS = get("minicpm-v-4.6").synthetic.tokenizer_config["extra_special_tokens"]

pytest.importorskip("transformers")

# Published key prefixes (openbmb/MiniCPM-V-4_6 safetensors header: 779 keys) and how many tensors
# each holds per layer; tiny counts follow from the tiny config.
PUBLISHED_PREFIX_COUNTS = {
    "model.vision_tower.encoder.": 432, "model.language_model.layers.": 318, "model.vision_tower.vit_merger.": 16,
    "model.merger.mlp.": 6, "model.vision_tower.embeddings.": 3, "model.vision_tower.post_layernorm.": 2,
    "model.language_model.norm.": 1, "model.language_model.embed_tokens.": 1,
}
PER_VIT_LAYER, PER_LINEAR_LAYER, PER_FULL_LAYER = 16, 14, 11
NAMED = ["image_token", "video_token", "image_start_token", "image_end_token", "slice_start_token",
         "slice_end_token", "image_id_start_token", "image_id_end_token"]
MESSAGES = [{"role": "user", "content": "What is in the image?"}]


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("synthetic46")
    return {f: make_checkpoint(f, root / f, size="tiny", seed=0) for f in VARIANTS}


def _header(path: Path) -> dict:
    with open(path, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(n))
    header.pop("__metadata__", None)
    return header


def _config(ckpt: Path) -> dict:
    return json.loads((ckpt / "config.json").read_text())


def _prefix(key: str) -> str:
    return next((p for p in PUBLISHED_PREFIX_COUNTS if key.startswith(p)), key)


def test_families_exported() -> None:
    assert VARIANTS == ["minicpm-v-4.6", "minicpm-v-4.6-thinking"]
    # 4.6-Thinking is a variant, not a family; MiniCPM-OCR and 4.7 share the projector and come after 4.6 (a
    # pair without our family key reads as 4.6).
    assert [f.key for f in families() if f.projector == "minicpmv4_6"] == ["minicpm-v-4.6", "minicpm-ocr-1.0",
                                                                          "minicpm-v-4.7"]
    assert sum(PUBLISHED_PREFIX_COUNTS.values()) == 779
    # The published per-layer tensor counts reproduce the published totals.
    assert 27 * PER_VIT_LAYER == 432 and 18 * PER_LINEAR_LAYER + 6 * PER_FULL_LAYER == 318


def test_no_heavy_imports_at_package_import() -> None:
    code = "import sys, minicpmv_edge.synthetic as s; assert 'minicpm-v-4.6' in s.synthetic_keys(); " \
           "assert 'transformers' not in sys.modules, 'transformers imported'; " \
           "assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
    for module in Path(m46.__file__).parent.glob("*.py"):   # no module of the factory imports them at the top
        tree = ast.parse(module.read_text())
        top = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
        names = {a.name.split(".")[0] for n in top if isinstance(n, ast.Import) for a in n.names}
        names |= {(n.module or "").split(".")[0] for n in top if isinstance(n, ast.ImportFrom)}
        assert not names & {"torch", "transformers", "safetensors"}, module.name


@pytest.mark.parametrize("fam", VARIANTS)
def test_files_and_config(ckpts: dict[str, Path], fam: str) -> None:
    ckpt = ckpts[fam]
    names = {p.name for p in ckpt.iterdir()}
    assert names == {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                     "tokenizer_config.json", "chat_template.jinja", "preprocessor_config.json",
                     "processor_config.json"}
    assert not [p for p in ckpt.parent.iterdir() if p.name.startswith(".")]   # no temp folders left

    cfg = _config(ckpt)
    assert cfg["architectures"] == ["MiniCPMV4_6ForConditionalGeneration"] and cfg["model_type"] == "minicpmv4_6"
    assert cfg["dtype"] == "bfloat16" and cfg["tie_word_embeddings"] is True
    assert cfg["insert_layer_id"] == cfg["vision_config"]["insert_layer_id"] == 1
    vis, txt = cfg["vision_config"], cfg["text_config"]
    assert vis["model_type"] == "minicpmv4_6_vision" and vis["image_size"] == 980 and vis["patch_size"] == 14
    assert vis["insert_layer_id"] < vis["num_hidden_layers"] == 3
    assert txt["model_type"] == "qwen3_5_text" and txt["tie_word_embeddings"] is True
    assert txt["layer_types"] == ["linear_attention"] * 3 + ["full_attention"]
    assert txt["full_attention_interval"] == 4 and txt["attn_output_gate"] is True
    assert txt["mtp_num_hidden_layers"] == 1 and txt["mtp_use_dedicated_embeddings"] is False
    assert txt["rope_parameters"] == {"partial_rotary_factor": 0.25, "rope_theta": 10000000, "rope_type": "default"}
    assert (txt["hidden_size"], txt["head_dim"], txt["num_attention_heads"],
            txt["num_key_value_heads"]) == (64, 16, 4, 2)
    assert (txt["linear_num_key_heads"], txt["linear_num_value_heads"]) == (2, 4)
    assert txt["vocab_size"] % 64 == 0 and txt["vocab_size"] >= build_tokenizer(fam).size

    vocab = build_tokenizer(fam).vocab
    assert cfg["image_token_id"] == vocab["<|image_pad|>"] and cfg["video_token_id"] == vocab["<|video_pad|>"]
    gen = json.loads((ckpt / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [vocab["<|im_end|>"], vocab["<|endoftext|>"]]
    assert gen["bos_token_id"] == gen["pad_token_id"] == vocab["<|endoftext|>"]
    assert ("chat_template_kwargs" in gen) == (fam == "minicpm-v-4.6")


@pytest.mark.parametrize("fam", VARIANTS)
def test_tensor_keys(ckpts: dict[str, Path], fam: str) -> None:
    header = _header(ckpts[fam] / "model.safetensors")
    assert {v["dtype"] for v in header.values()} == {"BF16"}
    assert not [k for k in header if k.startswith(("lm_head", "mtp")) or ".mtp." in k]
    counts = Counter(_prefix(k) for k in header)
    assert set(counts) == set(PUBLISHED_PREFIX_COUNTS), set(counts) ^ set(PUBLISHED_PREFIX_COUNTS)
    expected = {**PUBLISHED_PREFIX_COUNTS, "model.vision_tower.encoder.": 3 * PER_VIT_LAYER,
                "model.language_model.layers.": 3 * PER_LINEAR_LAYER + PER_FULL_LAYER}
    assert dict(counts) == expected
    assert header["model.vision_tower.embeddings.position_embedding.weight"]["shape"] == [70 * 70, 64]
    # Unequal linear key/value heads: qkv = 2*2*16 (q, k) + 4*16 (v).
    assert header["model.language_model.layers.0.linear_attn.in_proj_qkv.weight"]["shape"] == [2 * 2 * 16 + 4 * 16, 64]
    assert header["model.language_model.layers.0.linear_attn.A_log"]["shape"] == [4]


def test_tokenizer(ckpts: dict[str, Path]) -> None:
    from transformers import AutoTokenizer

    tok_json = json.loads((ckpts["minicpm-v-4.6"] / "tokenizer.json").read_text())
    split = tok_json["pre_tokenizer"]["pretokenizers"][0]
    assert split["type"] == "Split" and split["pattern"]["Regex"] == QWEN35_SPLIT
    assert tok_json["normalizer"]["type"] == "NFC"

    tok = AutoTokenizer.from_pretrained(ckpts["minicpm-v-4.6"])
    assert {n: getattr(tok, n) for n in NAMED} == NAMED_TOKENS
    cfg = _config(ckpts["minicpm-v-4.6"])
    assert tok.image_token_id == cfg["image_token_id"] and tok.video_token_id == cfg["video_token_id"]
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    for t in ["<think>", "</think>", "<tool_call>", "<unk>", *NAMED_TOKENS.values()]:
        assert len(tok(t, add_special_tokens=False).input_ids) == 1, t
    text = "Hello, world! 你好 12345 😀"
    assert tok.decode(tok(text).input_ids) == text

    plain = tok.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True, enable_thinking=False)
    assert plain.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    think = AutoTokenizer.from_pretrained(ckpts["minicpm-v-4.6-thinking"])
    assert think.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True).endswith(
        "<|im_start|>assistant\n<think>\n")
    assert think.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True,
                                     enable_thinking=False) == plain


def test_forward_448_image(ckpts: dict[str, Path]) -> None:
    import numpy as np
    import torch
    from PIL import Image
    from transformers import AutoTokenizer, MiniCPMV4_6ForConditionalGeneration, MiniCPMV4_6ImageProcessorPil

    ckpt = ckpts["minicpm-v-4.6"]
    proc = MiniCPMV4_6ImageProcessorPil.from_pretrained(ckpt)
    assert (proc.max_slice_nums, proc.scale_resolution, proc.patch_size, proc.downsample_mode) == (9, 448, 14, "16x")
    assert proc.slice_mode and proc.use_image_id and list(proc.image_mean) == list(proc.image_std) == [0.5] * 3
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (448, 448, 3), dtype=np.uint8))
    pix = proc(image, return_tensors="pt")
    assert pix["target_sizes"].tolist() == [[32, 32]] and pix["grids"] == [[0, 0]]   # one 448 view, no slices
    n_img = int(pix["target_sizes"].prod(-1)[0]) // 16                                 # 16x downsample: 64 tokens

    tok = AutoTokenizer.from_pretrained(ckpt)
    prompt = (f"<|im_start|>user\n{tok.image_id_start_token}0{tok.image_id_end_token}{tok.image_start_token}"
              f"{tok.image_token * n_img}{tok.image_end_token}\nWhat is it?<|im_end|>\n<|im_start|>assistant\n")
    ids = tok(prompt, return_tensors="pt").input_ids

    model, info = MiniCPMV4_6ForConditionalGeneration.from_pretrained(ckpt, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert model.dtype == torch.bfloat16
    assert model.lm_head.weight.data_ptr() == model.model.language_model.embed_tokens.weight.data_ptr()
    assert int((ids == model.config.image_token_id).sum()) == n_img == 64
    with torch.no_grad():
        out = model(input_ids=ids, pixel_values=pix["pixel_values"], target_sizes=pix["target_sizes"])
    assert out.logits.shape == (1, ids.shape[1], model.config.text_config.vocab_size)
    assert torch.isfinite(out.logits.float()).all()


def test_deterministic_and_replace(ckpts: dict[str, Path], tmp_path: Path) -> None:
    ref = (ckpts["minicpm-v-4.6"] / "model.safetensors").read_bytes()
    out = tmp_path / "ckpt"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    make_checkpoint("minicpm-v-4.6", out, seed=0)
    assert (out / "model.safetensors").read_bytes() == ref and not (out / "stale.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        assert (out / name).read_bytes() == (ckpts["minicpm-v-4.6"] / name).read_bytes()
    make_checkpoint("minicpm-v-4.6", out, seed=1)
    assert (out / "model.safetensors").read_bytes() != ref


def test_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="size"):
        make_checkpoint("minicpm-v-4.6", tmp_path / "x", size="huge")
    monkeypatch.setitem(sys.modules, "transformers", None)   # `import transformers` now raises ImportError
    with pytest.raises(RuntimeError, match=r"pip install -e '\.\[test\]'"):
        make_checkpoint("minicpm-v-4.6-thinking", tmp_path / "y")
    assert not list(tmp_path.iterdir())
