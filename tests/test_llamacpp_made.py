"""GGUF pairs made by llama.cpp's own converters (tests/llamacpp_made.py: the pinned sdist's legacy MiniCPM-V
flow, and `convert_hf_to_gguf.py --mmproj` for 4.6) run with the official layout: our runtime identifies the
family from what llama.cpp writes, and answers exactly as with our own pair of the same weights.
`any_family` (conftest): the resampler families and MiniCPM-V 4.6."""

from __future__ import annotations

import pytest
from official import random_image

from minicpmv_edge.families import families
from minicpmv_edge.runtime import load

# Where llama.cpp's converter output cannot answer as ours does, and why (both are llama.cpp's, not ours):
DIFFERENT_WEIGHTS = {
    # LlamaModel writes rope.scaling.type=longrope but not the rope_factors_long/short tensors.
    "minicpm-v-4.0": "llama.cpp's converter drops MiniCPM4's LongRoPE factors",
    # It writes rope.dimension_sections [11,11,10,0] whatever the head size; the tiny model's 4 rotary
    # dimensions make ggml abort the process (GGML_ASSERT(sect_dims <= ne0)) at the first decode.
    "minicpm-v-4.6": "llama.cpp's fixed M-RoPE sections abort ggml on the tiny model",
}


# Families llama.cpp's converters do not know (they make no pair of them).
NOT_IN_LLAMACPP = {"minicpm-ocr-1.0": "convert_hf_to_gguf.py has no MiniCPMOcrForConditionalGeneration",
                   "minicpm-v-4.7": "the pinned convert_hf_to_gguf.py has no MiniCPMV4_7ForConditionalGeneration"}


def test_llamacpp_pair_is_identified_as_its_family(llamacpp_pair, any_family: str) -> None:
    if any_family in NOT_IN_LLAMACPP:
        pytest.skip(NOT_IN_LLAMACPP[any_family])
    pair = llamacpp_pair(any_family)
    with load(pair.model, pair.mmproj) as model:
        assert model.family == any_family and not model.settings.from_file
        assert model.settings.use_image_id == (any_family != "minicpm-llama3-v-2.5")
        assert model.max_slice_nums == 9


@pytest.mark.parametrize("key", [f.key for f in families() if f.key not in {**DIFFERENT_WEIGHTS, **NOT_IN_LLAMACPP}])
def test_llamacpp_pair_answers_as_our_pair_of_the_same_weights(llamacpp_pair, converted, key: str) -> None:
    msgs = [{"role": "user", "content": [random_image((600, 400), 5), "What is in the image?"]}]
    answers = []
    for paths in ((llamacpp_pair(key).model, llamacpp_pair(key).mmproj),
                  (converted(key, "f16").llm_path, converted(key, "f16").mmproj_path)):
        with load(*paths) as model:
            items, _ = model.prepare(msgs)
            answers.append((len(items), [record.token for record in model.stream_generate(msgs, max_new_tokens=16)]))
    assert answers[0] == answers[1]
