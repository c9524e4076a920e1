"""Tensor plan and a streaming bf16 safetensors writer.

`plan_tensors` lists every published tensor name with its shape, in the published order
(LLM, vision tower, resampler, then the audio/TTS parts of MiniCPM-o). The writer computes
each shard's header from shapes alone and then generates and writes one tensor at a time, in
bounded chunks, so a full-size 8B checkpoint never sits in memory.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import BinaryIO

from minicpmv_edge.families.specs import CheckpointSpec

Shape = tuple[int, ...]
Entry = tuple[str, Shape]

BF16_BYTES = 2
FULL_SHARD_BYTES = 5_000_000_000   # save_pretrained's default max_shard_size="5GB"
_CHUNK = 1 << 24                   # elements generated per step (32 MiB of bf16)


def _decoder_layers(prefix: str, n: int, hidden: int, inter: int, heads: int, kv: int, head_dim: int,
                    qkv_bias: bool = False, qk_norm: bool = False) -> Iterator[Entry]:
    """Llama/Qwen2/Qwen3 decoder layers with transformers' own parameter names."""
    for i in range(n):
        p = f"{prefix}layers.{i}."
        for proj, rows in (("q", heads * head_dim), ("k", kv * head_dim), ("v", kv * head_dim)):
            yield f"{p}self_attn.{proj}_proj.weight", (rows, hidden)
            if qkv_bias:
                yield f"{p}self_attn.{proj}_proj.bias", (rows,)
        yield f"{p}self_attn.o_proj.weight", (hidden, heads * head_dim)
        if qk_norm:
            yield f"{p}self_attn.q_norm.weight", (head_dim,)
            yield f"{p}self_attn.k_norm.weight", (head_dim,)
        yield f"{p}mlp.gate_proj.weight", (inter, hidden)
        yield f"{p}mlp.up_proj.weight", (inter, hidden)
        yield f"{p}mlp.down_proj.weight", (hidden, inter)
        yield f"{p}input_layernorm.weight", (hidden,)
        yield f"{p}post_attention_layernorm.weight", (hidden,)


def _linear(name: str, out: int, inp: int, bias: bool = True) -> Iterator[Entry]:
    yield f"{name}.weight", (out, inp)
    if bias:
        yield f"{name}.bias", (out,)


def _norm(name: str, dim: int) -> Iterator[Entry]:
    yield f"{name}.weight", (dim,)
    yield f"{name}.bias", (dim,)


def plan_from_dims(spec: CheckpointSpec, d: dict[str, int]) -> list[Entry]:
    """(name, shape) of every tensor of a resampler-layout checkpoint for concrete dims `d` (`factory.dims`)."""
    h, hd = d["hidden"], d.get("head_dim") or d["hidden"] // d["heads"]
    out: list[Entry] = [("llm.model.embed_tokens.weight", (d["vocab"], h))]
    out += _decoder_layers("llm.model.", d["layers"], h, d["intermediate"], d["heads"], d["kv_heads"], hd,
                           qkv_bias=spec.llm == "qwen2", qk_norm=spec.llm == "qwen3")
    out.append(("llm.model.norm.weight", (h,)))
    if not spec.tie_word_embeddings:
        out.append(("llm.lm_head.weight", (d["vocab"], h)))

    vh, vi = d["v_hidden"], d["v_intermediate"]
    grid = 980 // 14   # llama.cpp hard-codes this 70x70 position bucket table
    out += [("vpm.embeddings.patch_embedding.weight", (vh, 3, 14, 14)), ("vpm.embeddings.patch_embedding.bias", (vh,)),
            ("vpm.embeddings.position_embedding.weight", (grid * grid, vh))]
    for i in range(d["v_layers"]):
        p = f"vpm.encoder.layers.{i}."
        for proj in ("k", "v", "q", "out"):
            out += _linear(f"{p}self_attn.{proj}_proj", vh, vh)
        out += [*_norm(f"{p}layer_norm1", vh), *_linear(f"{p}mlp.fc1", vi, vh), *_linear(f"{p}mlp.fc2", vh, vi),
                *_norm(f"{p}layer_norm2", vh)]
    out += _norm("vpm.post_layernorm", vh)

    # Resampler: embed_dim == LLM hidden, 128-wide heads, kv_proj has no bias, proj is used as x @ proj.
    out += [("resampler.query", (spec.query_num, h)), ("resampler.proj", (h, h)), ("resampler.kv_proj.weight", (h, vh)),
            ("resampler.attn.in_proj_weight", (3 * h, h)), ("resampler.attn.in_proj_bias", (3 * h,)),
            *_linear("resampler.attn.out_proj", h, h), *_norm("resampler.ln_q", h), *_norm("resampler.ln_kv", h),
            *_norm("resampler.ln_post", h)]
    if spec.audio:
        out += _audio_and_tts(spec, d)
    return out


def _audio_and_tts(spec: CheckpointSpec, d: dict[str, int]) -> list[Entry]:
    """MiniCPM-o extras: Whisper-style encoder (apm), its projector, and the TTS head. A
    converter to a vision+text GGUF must skip all of these."""
    a, f, h = d["a_dmodel"], d["a_ffn"], d["hidden"]
    out: list[Entry] = [("apm.conv1.weight", (a, 80, 3)), ("apm.conv1.bias", (a,)), ("apm.conv2.weight", (a, a, 3)),
                        ("apm.conv2.bias", (a,)), ("apm.embed_positions.weight", (1500, a))]
    for i in range(d["a_layers"]):
        p = f"apm.layers.{i}."
        out += [*_linear(f"{p}self_attn.k_proj", a, a, bias=False), *_linear(f"{p}self_attn.v_proj", a, a),
                *_linear(f"{p}self_attn.q_proj", a, a), *_linear(f"{p}self_attn.out_proj", a, a),
                *_norm(f"{p}self_attn_layer_norm", a), *_linear(f"{p}fc1", f, a), *_linear(f"{p}fc2", a, f),
                *_norm(f"{p}final_layer_norm", a)]
    out += [*_norm("apm.layer_norm", a), *_linear("audio_projection_layer.linear1", h, a),
            *_linear("audio_projection_layer.linear2", h, h)]

    t, th = d["tts_hidden"], d["tts_heads"]
    out += [*_linear("tts.projector.linear1", t, h), *_linear("tts.projector.linear2", t, t),
            ("tts.emb_text.weight", (d["tts_text_vocab"], t))]
    num_vq = 4 if spec.tts_layout == "chattts" else 1
    for k in range(num_vq):
        out.append((f"tts.emb_code.{k}.weight", (d["tts_audio_vocab"], t)))
    out += _decoder_layers("tts.model.", d["tts_layers"], t, d["tts_intermediate"], th, th, t // th)
    out.append(("tts.model.norm.weight", (t,)))
    for k in range(num_vq):
        if spec.tts_layout == "chattts":   # weight-normed heads, as torch's parametrizations name them
            out += [(f"tts.head_code.{k}.parametrizations.weight.original0", (d["tts_audio_vocab"], 1)),
                    (f"tts.head_code.{k}.parametrizations.weight.original1", (d["tts_audio_vocab"], t))]
        else:
            out.append((f"tts.head_code.{k}.weight", (d["tts_audio_vocab"], t)))
    return out


# --- values ----------------------------------------------------------------------------------

def _init_rule(name: str) -> tuple[float, float]:
    """(mean, std) keeping forward passes tame: norms ~1, biases small, matrices N(0, 0.02)."""
    leaf = name.rsplit(".", 1)[-1]
    is_norm = any(k in name for k in ("norm", "ln_q", "ln_kv", "ln_post"))
    if is_norm and leaf == "weight":
        return 1.0, 0.02
    if leaf == "bias" or leaf == "in_proj_bias":
        return 0.0, 0.01
    if name.endswith("original0"):   # weight-norm magnitudes
        return 1.0, 0.02
    return 0.0, 0.02


def _tensor_seed(seed: int, name: str) -> int:
    # Per-tensor seeds make every tensor reproducible on its own, whatever order it is written in.
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little") & (2**63 - 1)


def tensor_bytes(name: str, shape: Shape, seed: int) -> Iterator[memoryview]:
    """Deterministic bf16 data of one tensor, produced in bounded chunks."""
    import torch  # only when weights are written: importing the factory must not import torch

    mean, std = _init_rule(name)
    gen = torch.Generator().manual_seed(_tensor_seed(seed, name))
    remaining = math.prod(shape)
    while remaining:
        n = min(remaining, _CHUNK)
        # Sampling straight into bf16 skips a float32 pass; the generator is the bottleneck.
        chunk = torch.empty(n, dtype=torch.bfloat16).normal_(mean, std, generator=gen)
        yield memoryview(chunk.view(torch.int16).numpy()).cast("B")
        remaining -= n


def assign_shards(entries: Sequence[Entry], n_shards: int | None = None,
                  max_bytes: int = FULL_SHARD_BYTES) -> list[list[Entry]]:
    """Greedy split like save_pretrained; `n_shards=2` picks a byte limit that yields exactly two."""
    sizes = [math.prod(s) * BF16_BYTES for _, s in entries]
    if n_shards == 2 and len(entries) > 1:
        total, acc, cut = sum(sizes), 0, 0
        while acc + sizes[cut] < total / 2 and cut < len(sizes) - 2:
            acc += sizes[cut]
            cut += 1
        acc += sizes[cut]
        max_bytes = max(acc, total - acc)
    shards: list[list[Entry]] = [[]]
    used = 0
    for entry, size in zip(entries, sizes):
        if shards[-1] and used + size > max_bytes:
            shards.append([])
            used = 0
        shards[-1].append(entry)
        used += size
    return shards


def _header(entries: Sequence[Entry]) -> bytes:
    meta: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in entries:
        end = offset + math.prod(shape) * BF16_BYTES
        meta[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, end]}
        offset = end
    raw = json.dumps(meta, separators=(",", ":")).encode()
    return raw + b" " * (-len(raw) % 8)   # the format wants the data section 8-byte aligned


def write_safetensors(path: Path, entries: Sequence[Entry], seed: int) -> int:
    """Stream one shard to `path`; returns the number of data bytes written."""
    header = _header(entries)
    written = 0
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(header)))
        fh.write(header)
        for name, shape in entries:
            written += _write_tensor(fh, name, shape, seed)
    return written


def _write_tensor(fh: BinaryIO, name: str, shape: Shape, seed: int) -> int:
    n = 0
    for buf in tensor_bytes(name, shape, seed):
        fh.write(buf)
        n += len(buf)
    return n
