"""The published usage code runs unchanged: the MiniCPM-V 4.5 model card's snippets (chat with an image,
streamed, with a second round; multiple images; few-shot) and the MiniCPM-V cookbook's single-image and
thinking snippets, verbatim except for how the model and tokenizer are loaded (the `from_pretrained` lines;
`tokenizer` is the checkpoint's own transformers tokenizer, which `chat()` accepts and does not need). The
images they open are written where they expect them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from minicpmv_edge.runtime import ChatInputError, load

MODEL_CARD_CHAT_WITH_IMAGE = '''
import torch
from PIL import Image

torch.manual_seed(100)

image = Image.open('./assets/minicpmo2_6/show_demo.jpg').convert('RGB')

enable_thinking=False # If `enable_thinking=True`, the thinking mode is enabled.
stream=True # If `stream=True`, the answer is string

# First round chat 
question = "What is the landform in the picture?"
msgs = [{'role': 'user', 'content': [image, question]}]

answer = model.chat(
    msgs=msgs,
    tokenizer=tokenizer,
    enable_thinking=enable_thinking,
    stream=True
)

generated_text = ""
for new_text in answer:
    generated_text += new_text
    print(new_text, flush=True, end='')

# Second round chat, pass history context of multi-turn conversation
msgs.append({"role": "assistant", "content": [generated_text]})
msgs.append({"role": "user", "content": ["What should I pay attention to when traveling here?"]})

answer = model.chat(
    msgs=msgs,
    tokenizer=tokenizer,
    stream=True
)

generated_text = ""
for new_text in answer:
    generated_text += new_text
    print(new_text, flush=True, end='')
'''

COOKBOOK_SINGLE_IMAGE = '''
image = Image.open('./assets/single.png').convert('RGB')

# First round chat 
question = "What is the landform in the picture?"
msgs = [{'role': 'user', 'content': [image, question]}]

answer = model.chat(
    msgs=msgs,
    image=image,
    tokenizer=tokenizer
)
print(answer)

# Second round chat, pass history context of multi-turn conversation
msgs.append({"role": "assistant", "content": [answer]})
msgs.append({"role": "user", "content": [
            "What should I pay attention to when traveling here?"]})

answer = model.chat(
    msgs=msgs,
    image=None,
    tokenizer=tokenizer
)
print(answer)
'''

MODEL_CARD_MULTIPLE_IMAGES = '''
image1 = Image.open('image1.jpg').convert('RGB')
image2 = Image.open('image2.jpg').convert('RGB')
question = 'Compare image 1 and image 2, tell me about the differences between image 1 and image 2.'

msgs = [{'role': 'user', 'content': [image1, image2, question]}]

answer = model.chat(
    msgs=msgs,
    tokenizer=tokenizer
)
print(answer)
'''

MODEL_CARD_FEW_SHOT = '''
question = "production date" 
image1 = Image.open('example1.jpg').convert('RGB')
answer1 = "2023.08.04"
image2 = Image.open('example2.jpg').convert('RGB')
answer2 = "2007.04.24"
image_test = Image.open('test.jpg').convert('RGB')

msgs = [
    {'role': 'user', 'content': [image1, question]}, {'role': 'assistant', 'content': [answer1]},
    {'role': 'user', 'content': [image2, question]}, {'role': 'assistant', 'content': [answer2]},
    {'role': 'user', 'content': [image_test, question]}
]

answer = model.chat(
    msgs=msgs,
    tokenizer=tokenizer
)
print(answer)
'''

COOKBOOK_THINKING = '''
image1 = Image.open('assets/multi1.png').convert('RGB')
image2 = Image.open('assets/multi2.png').convert('RGB')
question = 'Compare the two images, tell me about the differences between them.'

msgs = [{'role': 'user', 'content': [image1, image2, question]}]

answer = model.chat(
    image=None,
    msgs=msgs,
    tokenizer=tokenizer
)
print(answer)

# Second round chat, pass history context of multi-turn conversation
msgs.append({"role": "assistant", "content": [answer]})
msgs.append({"role": "user", "content": ["Tell me about the similarities between them."]})
answer = model.chat(
    image=None,
    msgs=msgs,
    tokenizer=tokenizer,
    enable_thinking=True
)
print(answer)
'''

SNIPPETS = {
    "model card: chat with image, streamed, second round": MODEL_CARD_CHAT_WITH_IMAGE,
    "cookbook: single image, answer appended, second round": COOKBOOK_SINGLE_IMAGE,
    "model card: multiple images": MODEL_CARD_MULTIPLE_IMAGES,
    "model card: few-shot": MODEL_CARD_FEW_SHOT,
    "cookbook: thinking on the second round": COOKBOOK_THINKING,
}
IMAGES = ["assets/minicpmo2_6/show_demo.jpg", "assets/single.png", "image1.jpg", "image2.jpg", "example1.jpg",
          "example2.jpg", "test.jpg", "assets/multi1.png", "assets/multi2.png"]


class ShortAnswers:
    """The loaded model as the snippets see it: the published default of 2048 new tokens, which a random tiny
    model can spend in full, is lowered to keep the suite short; nothing else changes."""

    def __init__(self, model):  # noqa: ANN001
        self.model = model

    def chat(self, *args, **kwargs):  # noqa: ANN002, ANN003, ANN201
        return self.model.chat(*args, **{"max_new_tokens": 48, **kwargs})


@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoint) -> Path:  # noqa: ANN001
    return tiny_checkpoint("minicpm-v-4.5")


@pytest.fixture(scope="module")
def model(converted):  # noqa: ANN001, ANN201
    with load(converted("minicpm-v-4.5", "q8_0").llm_path.parent) as loaded:
        yield loaded


@pytest.fixture(scope="module")
def pictures(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("published")
    rng = np.random.default_rng(7)
    for index, name in enumerate(IMAGES):
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        size = (300 + 97 * index, 400 - 23 * index)
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return folder


@pytest.mark.parametrize("snippet", list(SNIPPETS))
def test_published_snippet_runs_unchanged(snippet: str, model, checkpoint: Path, hf_tokenizer, pictures: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(pictures)
    namespace = {"model": ShortAnswers(model), "tokenizer": hf_tokenizer(checkpoint), "Image": Image}
    exec(compile(SNIPPETS[snippet], snippet, "exec"), namespace)  # noqa: S102 - the published code, as published
    answer, msgs = namespace.get("answer"), namespace["msgs"]
    if isinstance(answer, str):
        assert answer == answer.text and isinstance(answer.reasoning, str) and answer.timings["prompt_tokens"] > 0
    # Every appended answer is part of the next prompt, as text.
    for message in msgs:
        if message["role"] == "assistant":
            for part in message["content"]:
                assert type(part) in (str, type(answer)) and isinstance(part, str)
    items, _ = model.prepare(msgs)
    assert sum(isinstance(item, tuple) for item in items) > 0


def test_chat_returns_a_str_that_continues_the_conversation(model) -> None:
    image = Image.fromarray(np.full((240, 320, 3), 90, dtype=np.uint8))
    msgs = [{"role": "user", "content": [image, "What is it?"]}]
    answer = model.chat(msgs=msgs, max_new_tokens=8, sampling=False)
    assert type(answer).__mro__[1] is str and answer.timings["generation_tokens"] <= 8
    follow = msgs + [{"role": "assistant", "content": [answer]}, {"role": "user", "content": ["And?"]}]
    with_object, _ = model.prepare(follow)
    as_text = msgs + [{"role": "assistant", "content": str(answer)}, {"role": "user", "content": "And?"}]
    assert with_object == model.prepare(as_text)[0]


def test_image_argument_and_json_messages_follow_the_published_rules(model) -> None:
    image = Image.fromarray(np.full((200, 300, 3), 30, dtype=np.uint8))
    reference = model.chat(msgs=[{"role": "user", "content": [image, "Describe."]}], max_new_tokens=6, sampling=False)
    # The published chat() puts `image` before the first message when its content is a string.
    assert model.chat(image=image, msgs=[{"role": "user", "content": "Describe."}], max_new_tokens=6,
                      sampling=False) == reference
    # ... and in the published positional order (image, msgs, tokenizer).
    assert model.chat(image, [{"role": "user", "content": "Describe."}], None, max_new_tokens=6,
                      sampling=False) == reference
    assert model.chat(msgs='[{"role": "user", "content": "Hi"}]', max_new_tokens=4, sampling=False) == \
        model.chat(msgs=[{"role": "user", "content": "Hi"}], max_new_tokens=4, sampling=False)
    batch = model.chat(msgs=[[{"role": "user", "content": "Hi"}], [{"role": "user", "content": [image, "Describe."]}]],
                       max_new_tokens=6, sampling=False)
    assert batch[1] == reference and len(batch) == 2


def test_generation_keywords_override_the_published_sampling(model) -> None:
    msgs = [{"role": "user", "content": "Count to ten."}]
    greedy = model.chat(msgs=msgs, max_new_tokens=8, sampling=False)
    assert model.chat(msgs=msgs, max_new_tokens=8, temperature=0.0) == greedy  # temperature 0 is greedy
    sampled = {model.chat(msgs=msgs, max_new_tokens=8, seed=seed, temperature=1.5, top_k=0, top_p=1.0)
               for seed in range(4)}
    assert len(sampled) > 1  # the published default samples; seeds differ


@pytest.mark.parametrize(("msgs", "kwargs", "needle"), [
    ([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": [{"answer": 1}]}], {},
     "message 2 (assistant): a content part of type dict is neither text, an image nor a video"),
    ([{"role": "robot", "content": "Hi"}], {}, "role must be user, assistant or system"),
    ([], {}, "msgs is empty"),
    ("not json", {}, "msgs is a string but not JSON"),
    ([{"role": "user", "content": "Hi"}], {"max_slice_nums": 0}, "max_slice_nums must be at least 1"),
    ([{"role": "user", "content": "Hi"}], {"beam_width": 2}, "chat() does not take beam_width"),
    ([{"role": "user", "content": "Hi"}], {"temporal_ids": [[1, 2]]}, "temporal_ids"),
])
def test_bad_chat_input_is_one_clear_error(model, msgs, kwargs: dict, needle: str) -> None:  # noqa: ANN001
    with pytest.raises(ChatInputError) as raised:
        model.chat(msgs=msgs, max_new_tokens=2, **kwargs)
    assert needle in str(raised.value) and "\n" not in str(raised.value)


def test_cli_bad_chat_input_is_one_line(converted, tmp_path: Path) -> None:  # noqa: ANN001
    model_dir = converted("minicpm-v-4.5", "q8_0").llm_path.parent
    proc = subprocess.run([sys.executable, "-m", "minicpmv_edge.cli.main", "ask", str(model_dir), "Hi",
                           "--max-slice-nums", "0"], capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
