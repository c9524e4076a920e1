"""Tiny but structurally faithful tokenizers for the synthetic checkpoints, from a family's `CheckpointSpec`.

Byte-level BPE families get the published `tokenizer.json` pipeline (split regex, normalizer,
byte-level pre-tokenizer/decoder, post-processor) with merges trained on `corpus.CORPUS`;
sentencepiece families (MiniCPM-V 4.0, a MiniCPM4 `LlamaTokenizer`) get a real byte-fallback
BPE `tokenizer.model` plus the `tokenizer.json` that transformers' legacy Llama conversion
produces from it. The family's special tokens are appended afterwards with their published
contents and `special` flags, so only the ids differ from the published files. Two file sets:
`published_files` (the transformers-4 era releases of the resampler families) and `backend_files`
(transformers 5's `TokenizersBackend` layout of MiniCPM-V 4.6).

Deliberate deviation: the published `tokenizer_config.json` names a remote-code class
(`MiniCPMVTokenizerFast` / `MiniCPMOTokenizerFast`) through `auto_map`; here `tokenizer_class` is
the standard class that remote class subclasses (`Qwen2TokenizerFast`, `LlamaTokenizerFast`) or
`PreTrainedTokenizerFast` for Llama-3, and `auto_map` is dropped, so `AutoTokenizer` loads
without `trust_remote_code`. The published name is kept as `published_tokenizer_class` in
`families/PUBLISHED.md`, not in the files. Ids the published files pin oddly (e.g. `<unk>` = 128244 in
the Qwen families) cannot be reproduced in a tiny vocabulary; such tokens are appended instead.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from typing import Any

import sentencepiece as spm
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from minicpmv_edge.families.specs import CheckpointSpec
from minicpmv_edge.families.tokens import LLAMA3_BASE, QWEN3_BASE

from .corpus import CORPUS

# Published pre-tokenizer split patterns (Qwen2/2.5/3 tokenizer.json; Meta-Llama-3 tokenizer.json).
QWEN2_SPLIT = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
LLAMA3_SPLIT = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
# Qwen3.5 pre-tokenizer split (llama.cpp: `qwen35`); differs from Qwen2's by the \p{M} classes.
QWEN35_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}"
                r"| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# CheckpointSpec.tokenizer of the byte-level families -> (split, Llama-3 pipeline)
_BYTELEVEL = {"bpe-qwen2": (QWEN2_SPLIT, False), "bpe-llama3": (LLAMA3_SPLIT, True),
              "bpe-qwen35": (QWEN35_SPLIT, False)}

BPE_TRAIN_VOCAB = 1536   # trained pieces incl. the 256-byte alphabet, before special tokens
SPM_TRAIN_VOCAB = 1200

_TOKENIZER_CLASS = {"bpe-qwen2": "Qwen2TokenizerFast", "bpe-llama3": "PreTrainedTokenizerFast",
                    "spm-llama": "LlamaTokenizerFast"}
_BASE_SPECIALS = {t for t, _ in QWEN3_BASE + LLAMA3_BASE}


@dataclass(frozen=True)
class TokenizerFiles:
    files: dict[str, bytes]       # file name -> content, ready to write
    vocab: dict[str, int]         # every token (incl. added) -> id
    size: int                     # len(tokenizer) as transformers reports it


def _lines() -> list[str]:
    return CORPUS.splitlines(keepends=True)


def _train_bytelevel(spec: CheckpointSpec) -> Tokenizer:
    try:
        split, llama3 = _BYTELEVEL[spec.tokenizer]
    except KeyError:
        raise ValueError(f"no byte-level tokenizer {spec.tokenizer!r}; known: {', '.join(_BYTELEVEL)}") from None
    return train_bytelevel(split, llama3)


def train_bytelevel(split: str, llama3: bool = False) -> Tokenizer:
    """A byte-level BPE trained on the corpus with the published pipeline: Qwen's (NFC, byte-level
    post-processor) or Llama-3's (no normalizer, merges ignored for whole words)."""
    pre = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(split), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=llama3, use_regex=False),
    ])
    trainer_tok = Tokenizer(models.BPE())
    trainer_tok.normalizer = None if llama3 else normalizers.NFC()
    trainer_tok.pre_tokenizer = pre
    trainer_tok.train_from_iterator(_lines(), trainers.BpeTrainer(
        vocab_size=BPE_TRAIN_VOCAB, min_frequency=1, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[]))
    trained = json.loads(trainer_tok.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in trained["merges"]]
    # Rebuild with exactly the published model flags (the trainer does not carry them over).
    tok = Tokenizer(models.BPE(vocab=trained["vocab"], merges=merges, dropout=None, unk_token=None,
                               continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False,
                               byte_fallback=False, ignore_merges=llama3))
    tok.normalizer = None if llama3 else normalizers.NFC()
    tok.pre_tokenizer = pre
    if llama3:
        tok.decoder = decoders.ByteLevel(add_prefix_space=True, trim_offsets=True, use_regex=True)
    else:
        tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
        tok.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    return tok


def _train_sentencepiece(spec: CheckpointSpec) -> tuple[bytes, Tokenizer]:
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_lines()), model_writer=buf, model_type="bpe", vocab_size=SPM_TRAIN_VOCAB,
        hard_vocab_limit=False, byte_fallback=True, split_digits=True, user_defined_symbols=list(spec.spm_user_symbols),
        normalization_rule_name="identity", add_dummy_prefix=True, remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True, character_coverage=0.9995, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        num_threads=1, minloglevel=2)
    model = buf.getvalue()
    sp = spm.SentencePieceProcessor(model_proto=model)
    vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
    # Same merge order transformers derives for sentencepiece BPE: by merged piece id, then part ids.
    merges: list[tuple[int, int, int, str, str]] = []
    for piece, pid in vocab.items():
        if sp.is_control(pid) or sp.is_unknown(pid) or sp.is_byte(pid) or sp.is_unused(pid):
            continue
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in vocab and right in vocab:
                merges.append((pid, len(left), len(right), left, right))
    merges.sort()
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[(m[3], m[4]) for m in merges], dropout=None, unk_token="<unk>",
                               fuse_unk=True, byte_fallback=True))
    # transformers' legacy LlamaTokenizerFast pipeline (what MiniCPM's tokenizer.json is built with).
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(content=" ", left=1, right=0)])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ("<unk>", "<s>", "</s>")])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in spec.spm_user_symbols])
    return model, tok


def _append_added(tok: Tokenizer, added: tuple[tuple[str, bool], ...]) -> None:
    for content, special in added:
        expected = tok.get_vocab_size(with_added_tokens=True)
        token = AddedToken(content, special=special, normalized=False)
        (tok.add_special_tokens if special else tok.add_tokens)([token])
        if tok.token_to_id(content) != expected:
            raise AssertionError(f"added token {content!r} collided with a trained piece")


def _additional_special(spec: CheckpointSpec) -> list[str]:
    if spec.tokenizer == "spm-llama":
        return [t for t, _ in spec.added_tokens] + list(spec.spm_user_symbols)
    extra = [t for t, special in spec.added_tokens if special and t not in _BASE_SPECIALS]
    return sorted(extra, key=lambda t: t != "<unk>")   # published lists start with <unk>


def _token_dict(content: str) -> dict[str, Any]:
    return {"content": content, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False}


def _dumps(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode()


def published_files(spec: CheckpointSpec) -> TokenizerFiles:
    """The tokenizer files of the transformers-4 era releases (the resampler families), trained
    deterministically: tokenizer.json, tokenizer_config.json (with the chat template), special_tokens_map.json
    and the family's extra files (vocab.json + merges.txt + added_tokens.json, or tokenizer.model)."""
    files: dict[str, bytes] = {}
    if spec.tokenizer == "spm-llama":
        files["tokenizer.model"], tok = _train_sentencepiece(spec)
    else:
        tok = _train_bytelevel(spec)
        base_vocab = tok.get_vocab(with_added_tokens=False)
        files["vocab.json"] = json.dumps(dict(sorted(base_vocab.items(), key=lambda kv: kv[1])),
                                         ensure_ascii=False).encode()
        merges = json.loads(tok.to_str())["model"]["merges"]
        files["merges.txt"] = ("#version: 0.2\n" + "".join(
            f"{' '.join(m) if isinstance(m, list) else m}\n" for m in merges)).encode()
    _append_added(tok, spec.added_tokens)
    vocab = tok.get_vocab(with_added_tokens=True)

    bos = {"bpe-llama3": "<|begin_of_text|>", "spm-llama": "<s>"}.get(spec.tokenizer)
    if bos is not None:  # published Llama-3 / MiniCPM4 files prepend BOS in the post-processor
        bos_proc = processors.TemplateProcessing(single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
                                                 special_tokens=[(bos, vocab[bos])])
        tok.post_processor = bos_proc if spec.tokenizer == "spm-llama" else processors.Sequence([
            processors.ByteLevel(add_prefix_space=True, trim_offsets=False, use_regex=True), bos_proc])
    files["tokenizer.json"] = _dumps(json.loads(tok.to_str()))

    added_decoder = {str(i): {**_token_dict(t.content), "special": t.special}
                     for i, t in sorted(tok.get_added_tokens_decoder().items())}
    # save_pretrained writes sorted keys; tokenizer_class replaces the remote class (module docstring).
    config = dict(sorted({**spec.tokenizer_config, "chat_template": spec.chat_template,
                          "added_tokens_decoder": added_decoder,
                          "additional_special_tokens": _additional_special(spec),
                          "tokenizer_class": _TOKENIZER_CLASS[spec.tokenizer]}.items()))
    files["tokenizer_config.json"] = _dumps(config)

    special_map: dict[str, Any] = {"additional_special_tokens": [_token_dict(t) for t in config["additional_special_tokens"]]}
    for key in spec.special_map_keys:
        if config.get(key) is not None:
            special_map[key] = _token_dict(config[key])
    files["special_tokens_map.json"] = _dumps(special_map)
    if "added_tokens.json" in spec.tokenizer_files:
        files["added_tokens.json"] = _dumps({t.content: i for i, t in sorted(
            tok.get_added_tokens_decoder().items(), key=lambda kv: kv[1].content)})
    return TokenizerFiles(files=files, vocab=vocab, size=len(vocab))


def backend_files(spec: CheckpointSpec) -> TokenizerFiles:
    """The tokenizer files transformers 5 writes (MiniCPM-V 4.6: `TokenizersBackend`): tokenizer.json and the
    spec's tokenizer_config.json verbatim; the chat template is a file of its own (the builder writes it)."""
    tok = _train_bytelevel(spec)
    _append_added(tok, spec.added_tokens)
    vocab = tok.get_vocab(with_added_tokens=True)
    files = {"tokenizer.json": _dumps(json.loads(tok.to_str())),
             "tokenizer_config.json": _dumps(spec.tokenizer_config)}
    return TokenizerFiles(files=files, vocab=vocab, size=len(vocab))
