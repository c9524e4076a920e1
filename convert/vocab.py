"""The tokenizer, written into the language-model GGUF so llama.cpp tokenizes text exactly as the
Hugging Face tokenizer does.

Byte-level BPE tokenizers (Qwen, Llama 3) are read from tokenizer.json: tokens in id order, merges, and
each added token's type (CONTROL when the tokenizer marks it special, USER_DEFINED otherwise, as
convert_hf_to_gguf.py does). SentencePiece tokenizers take pieces, scores and types from tokenizer.model
with tokenizer.json's added tokens laid over them. Special ids, merges and the chat template come from gguf's SpecialVocab. The
pre-tokenizer name is the family's, never guessed from a hash of the tokenizer's output.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import gguf
from gguf import GGUFWriter, TokenType

from .errors import ConversionError


def _looks_special(text: str) -> bool:
    return text.startswith("<|") and text.endswith("|>")


def _added_token_type(added: dict[str, Any]) -> int:
    return TokenType.CONTROL if added.get("special") or _looks_special(added["content"]) else TokenType.USER_DEFINED


def _read_tokenizer_json(folder: Path) -> dict[str, Any]:
    path = folder / "tokenizer.json"
    if not path.is_file():
        raise ConversionError(f"{folder} has no tokenizer.json")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ConversionError(f"{path} is not valid JSON: {e}") from None


def _padded(tokens: dict[int, tuple[str | bytes, float, int]], n_vocab: int) -> tuple[list, list[float], list[int]]:
    """Rows of the embedding beyond the tokenizer (published models pad the vocabulary) get placeholders."""
    if max(tokens) >= n_vocab:
        raise ConversionError(f"the tokenizer has token id {max(tokens)} but the model's vocab_size is {n_vocab}")
    rows = [tokens.get(i, (f"[PAD{i}]", -1000.0, TokenType.UNUSED)) for i in range(n_vocab)]
    return [t for t, _, _ in rows], [s for _, s, _ in rows], [int(k) for _, _, k in rows]


def _bpe_tokens(tokenizer: dict[str, Any]) -> dict[int, tuple[str | bytes, float, int]]:
    model = tokenizer.get("model") or {}
    if model.get("type") != "BPE" or not isinstance(model.get("vocab"), dict):
        raise ConversionError("tokenizer.json does not hold a BPE model")
    tokens: dict[int, tuple[str | bytes, float, int]] = {
        i: (text, 0.0, TokenType.NORMAL) for text, i in model["vocab"].items()}
    for added in tokenizer.get("added_tokens", []):
        tokens[added["id"]] = (added["content"], 0.0, _added_token_type(added))
    return tokens


def _sentencepiece_tokens(folder: Path, tokenizer: dict[str, Any]) -> dict[int, tuple[str | bytes, float, int]]:
    """Pieces, scores and types from tokenizer.model (llama.cpp's SPM tokenizer merges by score), with the
    added tokens of tokenizer.json laid over them as convert_hf_to_gguf.py does."""
    from sentencepiece import SentencePieceProcessor

    processor = SentencePieceProcessor()
    processor.LoadFromFile(str(folder / "tokenizer.model"))
    tokens: dict[int, tuple[str | bytes, float, int]] = {}
    for i in range(processor.vocab_size()):
        kind = (TokenType.UNKNOWN if processor.IsUnknown(i) else TokenType.CONTROL if processor.IsControl(i)
                else TokenType.UNUSED if processor.IsUnused(i) else TokenType.BYTE if processor.IsByte(i)
                else TokenType.NORMAL)
        tokens[i] = (processor.IdToPiece(i).encode(), processor.GetScore(i), kind)
    for added in tokenizer.get("added_tokens", []):
        tokens[added["id"]] = (added["content"].encode(), -1000.0, _added_token_type(added))
    return tokens


def write_vocab(writer: GGUFWriter, folder: Path, pre: str, n_vocab: int) -> int:
    """Add the tokenizer and chat template; returns the number of tokens."""
    tokenizer = _read_tokenizer_json(folder)
    sentencepiece = (folder / "tokenizer.model").is_file() and pre == "default"
    tokens = _sentencepiece_tokens(folder, tokenizer) if sentencepiece else _bpe_tokens(tokenizer)
    texts, scores, types = _padded(tokens, n_vocab)
    writer.add_tokenizer_model("llama" if sentencepiece else "gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(texts)
    if sentencepiece:
        writer.add_token_scores(scores)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(folder, load_merges=not sentencepiece, n_vocab=n_vocab)
    if not sentencepiece and not special.merges:
        raise ConversionError(f"{folder / 'tokenizer.json'} has no BPE merges")
    special.add_to_gguf(writer, quiet=True)
    return len(texts)
