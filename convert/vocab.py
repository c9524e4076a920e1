"""The tokenizer, written into the language-model GGUF so llama.cpp tokenizes text exactly as the
Hugging Face tokenizer does.

Byte-level BPE tokenizers (Qwen, Llama 3) are read from tokenizer.json: tokens in id order, merges, and
each added token's type (CONTROL when the tokenizer marks it special, USER_DEFINED otherwise, as
convert_hf_to_gguf.py does). SentencePiece tokenizers (tokenizer.model) go through gguf's own
SentencePieceVocab. Special ids, merges and the chat template come from gguf's SpecialVocab. The
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


def _bpe_tokens(tokenizer: dict[str, Any], n_vocab: int) -> tuple[list[str], list[int]]:
    model = tokenizer.get("model") or {}
    if model.get("type") != "BPE" or not isinstance(model.get("vocab"), dict):
        raise ConversionError("tokenizer.json does not hold a BPE model")
    by_id: dict[int, tuple[str, int]] = {i: (text, TokenType.NORMAL) for text, i in model["vocab"].items()}
    for added in tokenizer.get("added_tokens", []):
        special = added.get("special") or _looks_special(added["content"])
        by_id[added["id"]] = (added["content"], TokenType.CONTROL if special else TokenType.USER_DEFINED)
    if max(by_id) >= n_vocab:
        raise ConversionError(f"the tokenizer has token id {max(by_id)} but the model's vocab_size is {n_vocab}")
    # Rows of the embedding beyond the tokenizer (published models pad the vocabulary) get unused placeholders.
    tokens = [by_id.get(i, (f"[PAD{i}]", TokenType.UNUSED)) for i in range(n_vocab)]
    return [t for t, _ in tokens], [int(k) for _, k in tokens]


def write_vocab(writer: GGUFWriter, folder: Path, pre: str, n_vocab: int) -> int:
    """Add the tokenizer and chat template; returns the number of tokens."""
    if (folder / "tokenizer.model").is_file() and pre == "default":
        vocab = gguf.vocab.SentencePieceVocab(folder)  # type: ignore[attr-defined]
        tokens, scores, types = [], [], []
        for text, score, toktype in vocab.all_tokens():
            tokens.append(text)
            scores.append(score)
            types.append(int(toktype))
        for i in range(len(tokens), n_vocab):
            tokens.append(f"[PAD{i}]".encode())
            scores.append(-1000.0)
            types.append(int(TokenType.UNUSED))
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre("default")
        writer.add_token_list(tokens)
        writer.add_token_scores(scores)
        writer.add_token_types(types)
        load_merges = False
    else:
        path = folder / "tokenizer.json"
        if not path.is_file():
            raise ConversionError(f"{folder} has neither tokenizer.json nor tokenizer.model")
        try:
            tokenizer = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ConversionError(f"{path} is not valid JSON: {e}") from None
        tokens, types = _bpe_tokens(tokenizer, n_vocab)
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(pre)
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        load_merges = True
    special = gguf.SpecialVocab(folder, load_merges=load_merges, n_vocab=n_vocab)
    if load_merges and not special.merges:
        raise ConversionError(f"{folder / 'tokenizer.json'} has no BPE merges")
    special.add_to_gguf(writer, quiet=True)
    return len(tokens)
