"""llama.cpp, reading the vocabulary our converter wrote, tokenizes exactly as the Hugging Face tokenizer.

The reference is the published tokenizer.json run by Hugging Face's `tokenizers` (what the published fast
tokenizers execute). transformers 5.x rebuilds legacy SentencePiece Llama tokenizers (4.0) from
tokenizer.model with a pipeline that drops the space after a special token, unlike the file itself;
the BPE families are also checked through transformers' AutoTokenizer."""

from __future__ import annotations

from llama_cpp import Llama
from tokenizers import Tokenizer

SAMPLES = [
    "Hello world! It's 2026; the café serves crème brûlée at 7:30pm.",
    "你好，世界。这是一个多语言的测试：图像里有什么？",
    "こんにちは世界、カタカナとひらがな。한국어 문장도 있습니다. Привет, мир! مرحبا بالعالم",
    "def add(a, b):\n\treturn a + b  # 12345 6789.0e-3\n\n\n   indented   spaces",
    "emoji 🙂🚀👩‍💻 and symbols ∑∫√ ≤≥ «quotes» — dashes – and … ellipsis",
]


def special_tokens(tokenizer) -> list[str]:  # noqa: ANN001
    return [t for t in tokenizer.get_added_vocab() if t.startswith("<")][:12]


def test_llama_cpp_tokenizes_like_hf(any_family: str, converted, tiny_checkpoint, hf_tokenizer) -> None:
    family = any_family
    folder = tiny_checkpoint(family)
    reference = Tokenizer.from_file(str(folder / "tokenizer.json"))
    hf = hf_tokenizer(folder)
    model = Llama(str(converted(family, "q8_0").llm_path), vocab_only=True, verbose=False)
    specials = special_tokens(hf)
    assert len(specials) >= 3
    texts = SAMPLES + ["".join(f"{s}{sep}{text}" for s, text, sep in zip(specials, SAMPLES * 3, " \n" * 9))]
    sentencepiece = (folder / "tokenizer.model").is_file()
    for text in texts:
        expected = reference.encode(text, add_special_tokens=False).ids
        got = model.tokenize(text.encode(), add_bos=False, special=True)
        assert got == expected, text
        if not sentencepiece:
            assert hf.encode(text, add_special_tokens=False) == expected
        # SentencePiece's dummy-prefix space: HF drops it when decoding the first token, llama.cpp keeps it.
        decoded = model.detokenize(got, special=True).decode()
        assert decoded.removeprefix(" ") == reference.decode(expected, skip_special_tokens=False).removeprefix(" ")
