"""llama.cpp, reading the vocabulary our converter wrote, tokenizes exactly as the Hugging Face tokenizer."""

from __future__ import annotations

from llama_cpp import Llama
from transformers import AutoTokenizer

SAMPLES = [
    "Hello world! It's 2026; the café serves crème brûlée at 7:30pm.",
    "你好，世界。这是一个多语言的测试：图像里有什么？",
    "こんにちは世界、カタカナとひらがな。한국어 문장도 있습니다. Привет, мир! مرحبا بالعالم",
    "def add(a, b):\n\treturn a + b  # 12345 6789.0e-3\n\n\n   indented   spaces",
    "emoji 🙂🚀👩‍💻 and symbols ∑∫√ ≤≥ «quotes» — dashes – and … ellipsis",
]


def special_tokens(tokenizer) -> list[str]:  # noqa: ANN001
    return [t for t in tokenizer.get_added_vocab() if t.startswith("<")][:12]


def test_llama_cpp_tokenizes_like_hf(family: str, converted, tiny_checkpoint) -> None:
    hf = AutoTokenizer.from_pretrained(tiny_checkpoint(family))
    model = Llama(str(converted(family, "q8_0").llm_path), vocab_only=True, verbose=False)
    specials = special_tokens(hf)
    assert len(specials) >= 3
    texts = SAMPLES + ["".join(f"{s} {text}" for s, text in zip(specials, SAMPLES * 3))]
    for text in texts:
        expected = hf.encode(text, add_special_tokens=False)
        got = model.tokenize(text.encode(), add_bos=False, special=True)
        assert got == expected, text
        assert model.detokenize(got, special=True).decode() == hf.decode(expected)
