"""The engine's sequences. Explicit M-RoPE positions (the hook MiniCPM-V 4.7's canvas M-RoPE decodes through)
reproduce the plain path when they are the default ones and change the logits when they are not. Several
sequences in one context (the scheduler's continuous batching) give every family's greedy answers token for
token as the single-sequence engine does, also when one is cancelled or a follow-up turn reuses its prefix."""

from __future__ import annotations

from typing import Sequence

import llama_cpp
import numpy as np
import pytest
from PIL import Image

from minicpmv_edge.runtime import Sampling, load
from minicpmv_edge.runtime.model import Model
from minicpmv_edge.runtime.scheduler import ContextFull, GenerationRequest, Scheduler


def picture(size: tuple[int, int], seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))


class TablePlan:
    """A position plan that reads token rows from the GGUF's own token_embd and gives every item the
    sequential position [p, p, p, 0], plus `gap` from item `gap_at` on (0: the default positions)."""

    def __init__(self, token_embd: np.ndarray, gap_at: int = 0, gap: int = 0):
        self.token_embd, self.gap_at, self.gap = token_embd, gap_at, gap

    def positions(self, items: Sequence[object]) -> np.ndarray:
        p = np.arange(len(items), dtype=np.int32)
        p[self.gap_at:] += self.gap
        return np.stack([p, p, p, np.zeros_like(p)], axis=1)

    def token_rows(self, tokens: Sequence[int]) -> np.ndarray:
        return self.token_embd[np.asarray(tokens)]


def token_embd(path) -> np.ndarray:  # noqa: ANN001 - Path
    from gguf import GGUFReader
    from gguf.quants import dequantize

    tensor = next(t for t in GGUFReader(path).tensors if t.name == "token_embd.weight")
    return dequantize(tensor.data, tensor.tensor_type).astype(np.float32)


@pytest.fixture(scope="module")
def mrope_model(converted):  # noqa: ANN001, ANN201
    with load(converted("minicpm-v-4.6", "q8_0").llm_path.parent) as model:
        yield model


def logits_with(model: Model, items: list, plan: TablePlan | None) -> np.ndarray:
    model.reset()
    rows = []
    model.engine.feed(items, model.embeddings, on_logits=lambda start, block: rows.append(block), plan=plan)
    return np.concatenate(rows)


def test_position_plan_reproduces_plain_path_and_shifted_plan_does_not(mrope_model, converted) -> None:  # noqa: ANN001
    model = mrope_model
    assert model.engine.mrope
    items, _ = model.prepare([{"role": "user", "content": [picture((500, 300), 0), "What is in the image?"]}])
    assert any(isinstance(item, int) for item in items) and any(not isinstance(item, int) for item in items)
    table = token_embd(converted("minicpm-v-4.6", "q8_0").llm_path)
    plain = logits_with(model, items, None)
    # q8_0 rows dequantize to the same floats llama.cpp's get_rows gives, and the batches are the same: the
    # two paths agree to float32 rounding (measured: bit-identical).
    planned = logits_with(model, items, TablePlan(table))
    np.testing.assert_allclose(planned, plain, rtol=0, atol=1e-4)
    # A gap of 64 positions halfway changes relative distances, so attention (and the logits) must change.
    shifted = logits_with(model, items, TablePlan(table, gap_at=len(items) // 2, gap=64))
    assert np.abs(shifted[len(items) // 2:] - plain[len(items) // 2:]).max() > 1e-2
    # Generated tokens follow the plan of the last feed: sequential positions continue after the prompt.
    model.reset()
    model.engine.feed(items, model.embeddings, plan=TablePlan(table))
    token = int(plain[-1].argmax())
    model.engine.append_token(token)
    after_token = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(model.engine.ctx, -1),
                                        shape=(plain.shape[1],)).copy()
    np.testing.assert_allclose(after_token, logits_with(model, items + [token], None)[-1], rtol=0, atol=1e-4)


# ---- several sequences in one context ---------------------------------------------------------------------

# Three conversations of different lengths and images, and the number of tokens each generates (greedy).
def conversations() -> list[tuple[list[dict], int]]:
    return [([{"role": "user", "content": [picture((300, 200), 1), "What is in the image?"]}], 14),
            ([{"role": "user", "content": "Hello there, tell me a long story about a lighthouse."}], 25),
            ([{"role": "user", "content": [picture((420, 300), 2), picture((120, 120), 3), "Compare them."]}], 19)]


PROMPT = {"max_slice_nums": 2}  # few pieces per image: the tiny vision towers dominate the time otherwise


@pytest.fixture(scope="module")
def family_model(converted):  # noqa: ANN001, ANN201
    loaded: dict[str, Model] = {}

    def get(family: str) -> Model:
        if family not in loaded:
            loaded[family] = load(converted(family, "q8_0").llm_path.parent)
        return loaded[family]

    yield get
    for model in loaded.values():
        model.close()


def alone(model: Model, msgs: list[dict], n: int) -> list[int]:
    """The greedy answer of the single-sequence engine."""
    return [r.token for r in model.stream_generate(msgs, max_new_tokens=n, sampling=Sampling(), **PROMPT)]


def request(msgs: list[dict], n: int) -> GenerationRequest:
    return GenerationRequest(msgs, n, Sampling(), PROMPT)


def test_concurrent_conversations_equal_single_sequence_answers(any_family: str, family_model) -> None:  # noqa: ANN001
    model = family_model(any_family)
    chats = conversations()
    expected = [alone(model, msgs, n) for msgs, n in chats]
    with Scheduler(model, n_parallel=3) as scheduler:
        handles = [scheduler.submit(request(msgs, n)) for msgs, n in chats]
        answers = [[r.token for r in handle] for handle in handles]
    assert answers == expected
    assert model.engine.n_seq_max == 1  # the model is itself again
    assert alone(model, *chats[0]) == expected[0]


def test_cancelled_sequence_leaves_the_others_unaffected_and_frees_its_slot(family_model) -> None:  # noqa: ANN001
    model = family_model("minicpm-v-4.6")  # recurrent state: one cell per sequence
    chats = conversations()
    expected = [alone(model, msgs, n) for msgs, n in chats]
    with Scheduler(model, n_parallel=3) as scheduler:
        first, cancelled, third = (scheduler.submit(request(msgs, n)) for msgs, n in chats)
        started = []
        for record in cancelled:
            started.append(record.token)
            if len(started) == 5:
                cancelled.cancel()
        late = scheduler.submit(request(*chats[1]))  # gets the freed sequence
        assert [[r.token for r in h] for h in (first, third, late)] == [expected[0], expected[2], expected[1]]
    assert started == expected[1][:5]


@pytest.mark.parametrize("key", ["minicpm-v-4.5", "minicpm-v-4.6"])
def test_a_prompt_longer_than_a_sequence_waits_for_idle_sequences_and_grows_the_context(key: str, family_model) -> None:  # noqa: ANN001
    model = family_model(key)
    long_text = " ".join(f"line {i} of a long page." for i in range(80))
    chats = conversations() + [([{"role": "user", "content": [picture((300, 200), 4), long_text]}], 12)]
    expected = [alone(model, msgs, n) for msgs, n in chats]
    lengths = [len(model.prepare(msgs, **PROMPT)[0]) + n for msgs, n in chats]
    with Scheduler(model, n_parallel=2, n_ctx=min(lengths)) as scheduler:
        # llama.cpp pads a sequence's cells (to 256 here): the last request must still not fit.
        assert min(lengths) <= scheduler.engine.n_ctx < max(lengths)
        handles = [scheduler.submit(request(msgs, n)) for msgs, n in chats]
        assert [[r.token for r in handle] for handle in handles] == expected
        assert scheduler.engine.n_ctx >= max(lengths)


def test_a_capped_context_does_not_grow_and_refuses_an_answer_that_must_fit(family_model) -> None:  # noqa: ANN001
    model = family_model("minicpm-v-4.5")
    msgs, n = conversations()[1]
    with Scheduler(model, n_parallel=2, n_ctx=256, max_ctx=256) as scheduler:
        prompt = len(model.prepare(msgs, **PROMPT)[0])
        longest = scheduler.engine.n_ctx - prompt
        fixed_length = Sampling(ignore_eos=True)
        ended = [r for r in scheduler.submit(GenerationRequest(msgs, longest + 40, fixed_length, PROMPT))]
        assert len(ended) == longest and ended[-1].finish_reason == "length"
        with pytest.raises(ContextFull):
            list(scheduler.submit(GenerationRequest(msgs, longest + 40, fixed_length, PROMPT, answer_must_fit=True)))
        assert scheduler.engine.n_ctx == 256


@pytest.mark.parametrize("key", ["minicpm-v-4.5", "minicpm-v-4.6"])
def test_follow_up_turn_reuses_its_prefix_beside_other_sequences(key: str, family_model, monkeypatch) -> None:  # noqa: ANN001
    model = family_model(key)
    chats = conversations()
    first_msgs, n = chats[0]
    first = [r for r in model.stream_generate(first_msgs, max_new_tokens=n, **PROMPT)]
    follow_up = first_msgs + [{"role": "assistant", "content": "".join(r.text for r in first)},
                              {"role": "user", "content": "Say more about its colours."}]
    expected = alone(model, follow_up, 16), alone(model, *chats[1])
    reused: dict[int, int] = {}  # prompt length -> items its sequence's cache already held
    rewind = model.engine.rewind

    def spy(slot, items, *args):  # noqa: ANN001, ANN002, ANN202
        reused[len(items)] = rewind(slot, items, *args)
        return reused[len(items)]

    monkeypatch.setattr(model.engine, "rewind", spy)
    with Scheduler(model, n_parallel=2) as scheduler:
        assert [r.token for r in scheduler.submit(request(first_msgs, n))] == [r.token for r in first]
        other = scheduler.submit(request(*chats[1]))
        again = scheduler.submit(request(follow_up, 16))
        assert ([r.token for r in again], [r.token for r in other]) == expected
    # The follow-up found its conversation's sequence: no image row is decoded again (the chat template
    # renders the earlier answer's turn differently from the generation prompt, so the last few positions are).
    # A recurrent state that cannot roll back that far restarts that sequence alone, so 4.6 checks only that
    # the answers are right.
    if key == "minicpm-v-4.5":
        items, _ = model.prepare(first_msgs, **PROMPT)
        after_image = 1 + max(i for i, item in enumerate(items) if not isinstance(item, int))
        assert reused[max(reused)] >= after_image
