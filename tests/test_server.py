"""`minicpmv serve` on the tiny model, in this process (uvicorn on a thread, a free port): the official
`openai` client gets exactly the greedy answers `Model.chat(sampling=False)` / `stream_generate` give for
the same messages and settings, whole, streamed, and four at once; raw HTTP gets OpenAI-shaped errors with
the right status for every bad request, and the server goes on answering after each. A second server over
the same model, whose generation a test can hold or slow, checks the API key, the full queue and a client
that leaves mid-stream."""

from __future__ import annotations

import base64
import io
import json
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import urlparse

import httpx
import openai
import pytest
from PIL import Image, ImageDraw

from minicpmv_edge.runtime import Model, Sampling, load
from minicpmv_edge.server import BackgroundServer, ServerSettings
from minicpmv_edge.server.app import _free_port
from minicpmv_edge.server.backend import EngineBackend
from minicpmv_edge.server.errors import ApiError
from minicpmv_edge.server.output import AnswerShaper, Delta
from minicpmv_edge.server.protocol import ImageReader

MAX_TOKENS = 24
BODY_LIMIT = 1 << 20
PIXEL_LIMIT = 4_000_000
API_KEY = "test-key"


def picture(seed: int, size: tuple[int, int] = (320, 240)) -> Image.Image:
    image = Image.new("RGB", size, (240, 240, 230))
    draw = ImageDraw.Draw(image)
    draw.ellipse((20 + 10 * seed, 30, 160, 170), fill=(200, 40 * seed % 255, 40))
    draw.rectangle((180, 60, 300, 200 - 10 * seed), fill=(40, 80, 200))
    return image


def data_url(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


# The same conversations in the API's form and in the runtime's (images as PIL images).
CONVERSATIONS = {
    "hello": ([{"role": "user", "content": "Hello, who are you?"}],
              [{"role": "user", "content": ["Hello, who are you?"]}]),
    "system": ([{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Name a colour."}],
               [{"role": "system", "content": ["Answer briefly."]}, {"role": "user", "content": ["Name a colour."]}]),
    "image": ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(picture(1))}},
                                            {"type": "text", "text": "What is in the image?"}]}],
              [{"role": "user", "content": [picture(1), "What is in the image?"]}]),
    "multi-turn": ([{"role": "user", "content": "Count to three."}, {"role": "assistant", "content": "1 2 3"},
                    {"role": "user", "content": [{"type": "text", "text": "And this?"},
                                                 {"type": "image_url", "image_url": {"url": data_url(picture(2))}}]}],
                   [{"role": "user", "content": ["Count to three."]}, {"role": "assistant", "content": ["1 2 3"]},
                    {"role": "user", "content": ["And this?", picture(2)]}]),
}


@pytest.fixture(scope="module")
def model(converted) -> Iterator[Model]:  # noqa: ANN001
    with load(converted("minicpm-v-4.5", "q8_0").llm_path.parent, n_threads=2) as loaded:
        yield loaded


@pytest.fixture(scope="module")
def references(model: Model) -> dict[str, dict[str, Any]]:
    """Per conversation: the greedy stream_generate text, chat(sampling=False)'s answer and the prompt size."""
    done = {}
    for name, (_, msgs) in CONVERSATIONS.items():
        text = "".join(r.text for r in model.stream_generate(msgs, max_new_tokens=MAX_TOKENS, sampling=Sampling(0.0)))
        done[name] = {"text": text, "chat": model.chat(msgs, sampling=False, max_new_tokens=MAX_TOKENS),
                      "prompt_tokens": len(model.prepare(msgs)[0])}
    thinking = [{"role": "user", "content": ["Think about it."]}]
    done["thinking"] = {"text": "".join(r.text for r in model.stream_generate(
        thinking, max_new_tokens=MAX_TOKENS, sampling=Sampling(0.0), enable_thinking=True))}
    return done


@pytest.fixture(scope="module")
def server(model: Model, references: dict) -> Iterator[BackgroundServer]:
    settings = ServerSettings(port=0, max_body_bytes=BODY_LIMIT, max_image_pixels=PIXEL_LIMIT, parallel=4,
                              max_queue=8, context=1024)
    with BackgroundServer(model, settings) as running:
        yield running


@pytest.fixture(scope="module")
def client(server: BackgroundServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url, api_key="unused", max_retries=0)


def ask(client: openai.OpenAI, name: str, **options: Any) -> Any:
    return client.chat.completions.create(model="any", messages=CONVERSATIONS[name][0], max_tokens=MAX_TOKENS,
                                          temperature=0, **options)


def test_plain_completion_equals_the_runtime_greedy_answer(client: openai.OpenAI, references: dict) -> None:
    reply = ask(client, "hello")
    expected = references["hello"]
    assert reply.choices[0].message.content == expected["text"]
    assert reply.choices[0].message.content.strip() == expected["chat"]
    assert reply.choices[0].finish_reason == "length"  # random weights do not stop by themselves
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens, reply.usage.total_tokens) == \
        (expected["prompt_tokens"], MAX_TOKENS, expected["prompt_tokens"] + MAX_TOKENS)


def test_max_completion_tokens_and_system_messages(client: openai.OpenAI, references: dict) -> None:
    reply = client.chat.completions.create(model="any", messages=CONVERSATIONS["system"][0], temperature=0,
                                           max_completion_tokens=MAX_TOKENS)
    assert reply.choices[0].message.content == references["system"]["text"]


def test_streamed_deltas_concatenate_to_the_plain_answer(client: openai.OpenAI, references: dict) -> None:
    chunks = list(ask(client, "image", stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == references["image"]["text"] == ask(client, "image").choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.prompt_tokens == references["image"]["prompt_tokens"]
    assert chunks[-1].usage.completion_tokens == MAX_TOKENS
    assert all(c.usage is None for c in chunks[:-1])


def test_four_concurrent_requests_equal_their_sequential_answers(client: openai.OpenAI, references: dict) -> None:
    names = list(CONVERSATIONS)
    with ThreadPoolExecutor(len(names)) as pool:
        replies = list(pool.map(lambda name: ask(client, name), names))
    assert [r.choices[0].message.content for r in replies] == [references[name]["text"] for name in names]


def test_image_data_url_answers_as_the_pil_image_does(client: openai.OpenAI, references: dict) -> None:
    reply = ask(client, "multi-turn")
    assert reply.choices[0].message.content == references["multi-turn"]["text"]
    assert reply.usage.prompt_tokens == references["multi-turn"]["prompt_tokens"]


def test_stop_sequences_cut_the_answer_and_end_it(client: openai.OpenAI, references: dict) -> None:
    full = references["hello"]["text"]
    stop = full[6:9]
    expected = full[:full.index(stop)]
    whole = ask(client, "hello", stop=[stop, "never-generated"])
    assert (whole.choices[0].message.content, whole.choices[0].finish_reason) == (expected, "stop")
    assert whole.usage.completion_tokens < MAX_TOKENS
    streamed = list(ask(client, "hello", stop=stop, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == expected
    assert streamed[-1].choices[0].finish_reason == "stop"


def test_thinking_mode_returns_reasoning_separately(client: openai.OpenAI, references: dict) -> None:
    """Random weights never close their reasoning, so all of it is reasoning_content; the split itself is
    checked below on text that does."""
    options = dict(model="any", messages=[{"role": "user", "content": "Think about it."}], max_tokens=MAX_TOKENS,
                   temperature=0, extra_body={"enable_thinking": True})
    message = client.chat.completions.create(**options).choices[0].message
    assert message.reasoning_content == references["thinking"]["text"].replace("<think>", "").strip()
    assert message.content == ""
    streamed = list(client.chat.completions.create(stream=True, **options))
    assert "".join(getattr(c.choices[0].delta, "reasoning_content", None) or "" for c in streamed) == \
        message.reasoning_content


@pytest.mark.parametrize("pieces", [
    ["<think>\nI weigh it.\n</think>\n\nThe answer.", ""],
    list("<think>\nI weigh it.\n</think>\n\nThe answer."),
    ["<thi", "nk>\nI weigh", " it.\n</th", "ink>", "\n", "\nThe", " answer."],
])
def test_reasoning_and_answer_split_alike_however_the_text_arrives(pieces: list[str]) -> None:
    shaper = AnswerShaper([], thinking=True)
    deltas = [shaper.push(piece) for piece in pieces] + [shaper.finish()]
    assert "".join(d.reasoning for d in deltas) == "I weigh it."
    assert "".join(d.content for d in deltas) == "The answer."


def test_stop_sequences_split_across_pieces_are_found() -> None:
    shaper = AnswerShaper(["STOP", "END!"], thinking=False)
    out = [shaper.push(p) for p in ["Some", " text S", "TO", "P more"]]
    assert "".join(d.content for d in out) + shaper.finish().content == "Some text "
    assert shaper.stopped
    almost = AnswerShaper(["STOP"], thinking=False)
    assert "".join(almost.push(p).content for p in ["ST", "OOP"]) + almost.finish().content == "STOOP"
    assert Delta() == Delta("", "") and not Delta()


def test_models_and_health(server: BackgroundServer, converted) -> None:  # noqa: ANN001
    models = httpx.get(f"{server.url}/models").json()
    assert models["object"] == "list"
    assert [m["id"] for m in models["data"]] == [converted("minicpm-v-4.5", "q8_0").llm_path.stem]
    health = httpx.get(server.url.removesuffix("/v1") + "/health").json()
    assert (health["status"], health["requests"], health["parallel"]) == ("ok", 0, 4)


def post(server: BackgroundServer, body: bytes | dict, **headers: str) -> httpx.Response:
    content = body if isinstance(body, bytes) else None
    return httpx.post(f"{server.url}/chat/completions", content=content,
                      json=None if content is not None else body,
                      headers={"content-type": "application/json", **headers}, timeout=30)


def user_parts(*parts: dict) -> dict:
    return {"messages": [{"role": "user", "content": list(parts)}], "max_tokens": 4}


def image_part(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


BAD_REQUESTS = [
    (b'{"messages": [', 400, "invalid_json"),
    (b"[1, 2]", 400, "invalid_request"),
    ({"model": "x"}, 400, "missing_messages"),
    ({"messages": []}, 400, "missing_messages"),
    ({"messages": [{"role": "tool", "content": "x"}]}, 400, "invalid_request"),
    ({"messages": [{"role": "user", "content": "x"}], "temperature": "hot"}, 400, "invalid_request"),
    ({"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}, 400, "invalid_request"),
    ({"messages": [{"role": "user", "content": "x"}], "n": 2}, 400, "invalid_request"),
    ({"messages": [{"role": "user", "content": "x"}], "max_tokens": 5000}, 400, "context_length_exceeded"),
    ({"messages": [{"role": "user", "content": "x"}], "max_slice_nums": 0}, 400, "invalid_request"),
    (user_parts(image_part("data:image/png;base64," + base64.b64encode(b"\x89PNG broken").decode())), 400,
     "invalid_image"),
    (user_parts(image_part("data:image/png;base64,***")), 400, "invalid_image"),
    (user_parts(image_part("http://127.0.0.1:9/cat.png")), 400, "remote_images_disabled"),
    (user_parts(image_part("/etc/hostname")), 400, "local_images_disabled"),
    (user_parts(image_part("ftp://127.0.0.1/cat.png")), 400, "invalid_image"),
    (user_parts({"type": "input_audio", "input_audio": {}}), 400, "invalid_request"),
    (user_parts(image_part(data_url(Image.new("RGB", (2100, 2000), "white")))), 413, "image_too_large"),
    (b'{"messages": "' + b"x" * BODY_LIMIT + b'"}', 413, "request_too_large"),
]


@pytest.mark.parametrize("body, status, code", BAD_REQUESTS,
                         ids=[f"{status}-{code}-{i}" for i, (_, status, code) in enumerate(BAD_REQUESTS)])
def test_bad_requests_get_openai_shaped_errors_and_the_server_goes_on(
        server: BackgroundServer, client: openai.OpenAI, references: dict, body: Any, status: int, code: str) -> None:
    response = post(server, body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code and error["type"] == "invalid_request_error" and error["message"]
    assert ask(client, "hello").choices[0].message.content == references["hello"]["text"]


def test_local_images_only_inside_the_allowed_folder(tmp_path: Path) -> None:
    allowed, outside = tmp_path / "allowed", tmp_path / "outside.png"
    allowed.mkdir()
    picture(1).save(allowed / "page.png")
    picture(2).save(outside)
    reader = ImageReader(ServerSettings(local_image_dir=allowed))
    assert reader.read(str(allowed / "page.png")).size == reader.read("page.png").size == (320, 240)
    assert reader.read((allowed / "page.png").as_uri()).size == (320, 240)
    for escape in (str(outside), "../outside.png", outside.as_uri(), "missing.png"):
        with pytest.raises(ApiError) as refused:
            reader.read(escape)
        assert (refused.value.status, refused.value.code) == (400, "image_not_found")


def test_library_errors_reach_the_openai_client_as_bad_requests(client: openai.OpenAI) -> None:
    """A truncated PNG opens (its header is whole) and fails to decode in the runtime: ImageInputError."""
    png = base64.b64decode(data_url(picture(3)).split(",", 1)[1])
    truncated = "data:image/png;base64," + base64.b64encode(png[:len(png) // 2]).decode()
    broken = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": truncated}}]}]
    with pytest.raises(openai.BadRequestError, match="decode"):
        client.chat.completions.create(model="any", messages=broken, max_tokens=4)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="any", messages=broken, max_tokens=4, stream=True)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="any", prompt="x")


# ---- a second server whose requests a test can hold or slow: API key, full queue, leaving clients ----------

class SlowEngine:
    """The model's engine, each decode step `delay` seconds late; counts the steps."""

    def __init__(self, engine: Any):
        self._engine = engine
        self.delay, self.steps = 0.0, 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)

    def decode(self, runs: Any) -> Any:
        time.sleep(self.delay)
        self.steps += 1
        return self._engine.decode(runs)


class HeldModel:
    """A model whose prompts wait for `gate` before they are laid out (`preparing` tells one is waiting)
    and whose engine is a `SlowEngine`."""

    def __init__(self, model: Model):
        self._model = model
        self.engine = SlowEngine(model.engine)
        self.gate, self.preparing = threading.Event(), threading.Event()
        self.gate.set()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model, name)

    def prepare(self, *args: Any, **kwargs: Any) -> Any:
        self.preparing.set()
        self.gate.wait()
        return self._model.prepare(*args, **kwargs)


@pytest.fixture
def held(converted) -> Iterator[tuple[HeldModel, BackgroundServer]]:  # noqa: ANN001
    """One sequence and one waiting place, over a second load of the tiny model (loads take 0.1 s)."""
    with load(converted("minicpm-v-4.5", "q8_0").llm_path.parent, n_threads=2) as loaded:
        held_model = HeldModel(loaded)
        backend = EngineBackend(held_model, parallel=1, max_queue=1, context=1024,  # type: ignore[arg-type]
                                default_max_tokens=MAX_TOKENS)
        try:
            with BackgroundServer(backend, ServerSettings(port=0, api_key=API_KEY)) as running:
                yield held_model, running
        finally:
            held_model.gate.set()
            backend.close()


def health(server: BackgroundServer) -> dict:
    return httpx.get(server.url.removesuffix("/v1") + "/health").json()


def wait_for(condition: Any, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


AUTH = {"authorization": f"Bearer {API_KEY}"}


def raw_request(server: BackgroundServer, body: dict) -> socket.socket:
    """A request sent on a bare socket, so that a test can leave (close it) before any answer comes."""
    address = urlparse(server.url)
    payload = json.dumps(body).encode()
    connection = socket.create_connection((address.hostname, address.port))
    connection.sendall(f"POST {address.path}/chat/completions HTTP/1.1\r\nHost: {address.netloc}\r\n"
                       f"Authorization: Bearer {API_KEY}\r\nContent-Type: application/json\r\n"
                       f"Content-Length: {len(payload)}\r\n\r\n".encode() + payload)
    return connection
HELLO = {"messages": CONVERSATIONS["hello"][0], "max_tokens": MAX_TOKENS, "temperature": 0}


def test_api_key_is_required_when_set(held: tuple[HeldModel, BackgroundServer], references: dict) -> None:
    _, server = held
    for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": f"Basic {API_KEY}"}):
        response = post(server, HELLO, **headers)
        assert response.status_code == 401
        assert response.json()["error"]["type"] == "authentication_error"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url, api_key="wrong", max_retries=0).models.list()
    assert health(server)["status"] == "ok"  # open without the key
    right = openai.OpenAI(base_url=server.url, api_key=API_KEY, max_retries=0)
    reply = right.chat.completions.create(model="any", messages=HELLO["messages"], max_tokens=MAX_TOKENS, temperature=0)
    assert reply.choices[0].message.content == references["hello"]["text"]


def test_a_full_queue_answers_503_and_a_waiting_client_may_leave(held: tuple[HeldModel, BackgroundServer],
                                                                 references: dict) -> None:
    held_model, server = held
    held_model.gate.clear()
    with ThreadPoolExecutor(1) as pool:
        first = pool.submit(post, server, HELLO, **AUTH)
        wait_for(held_model.preparing.is_set)  # the first is out of the queue, held
        with raw_request(server, {**HELLO, "stream": True}):  # takes the one waiting place...
            wait_for(lambda: health(server)["requests"] == 2)
            refused = post(server, HELLO, **AUTH)
            assert refused.status_code == 503 and refused.headers["retry-after"] == "2"
            assert refused.json()["error"]["code"] == "queue_full"
        held_model.gate.set()  # ...and leaves before its answer starts
        assert first.result().json()["choices"][0]["message"]["content"] == references["hello"]["text"]
    wait_for(lambda: health(server)["requests"] == 0)
    assert post(server, HELLO, **AUTH).json()["choices"][0]["message"]["content"] == references["hello"]["text"]


def test_a_client_leaving_mid_stream_stops_its_generation(held: tuple[HeldModel, BackgroundServer],
                                                          references: dict) -> None:
    held_model, server = held
    held_model.engine.delay = 0.02  # 900 tokens would take 18 s
    body = {"messages": CONVERSATIONS["system"][0], "max_tokens": 900, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{server.url}/chat/completions", json=body, headers=AUTH, timeout=30) as response:
        assert response.status_code == 200
        lines = response.iter_lines()
        assert sum(1 for line, _ in zip(lines, range(8)) if line.startswith("data: ")) >= 3
    wait_for(lambda: health(server)["requests"] == 0, timeout=10)
    steps = held_model.engine.steps
    time.sleep(0.3)
    assert held_model.engine.steps == steps < 100  # the sequence was freed: no more steps
    held_model.engine.delay = 0.0
    reply = openai.OpenAI(base_url=server.url, api_key=API_KEY, max_retries=0).chat.completions.create(
        model="any", messages=HELLO["messages"], max_tokens=MAX_TOKENS, temperature=0)
    assert reply.choices[0].message.content == references["hello"]["text"]


def test_cli_serves_until_interrupted(converted, references: dict) -> None:  # noqa: ANN001
    """`minicpmv serve MODEL --port P`: answers as the library does; Ctrl-C shuts it down gracefully and
    exits 130, as every command does on Ctrl-C."""
    port = _free_port("127.0.0.1")
    command = [sys.executable, "-m", "minicpmv_edge.cli.main", "serve",
               str(converted("minicpm-v-4.5", "q8_0").llm_path.parent), "--port", str(port), "-t", "2",
               "--parallel", "1"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}"

        def up() -> bool:
            assert process.poll() is None, process.communicate()[1]
            try:
                return httpx.get(f"{url}/health").status_code == 200
            except httpx.TransportError:
                return False

        wait_for(up, timeout=60)
        reply = httpx.post(f"{url}/v1/chat/completions", json=HELLO, timeout=30).json()
        assert reply["choices"][0]["message"]["content"] == references["hello"]["text"]
    finally:
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=30)
    assert process.returncode == 130 and "Application shutdown complete" in stderr, stderr
    assert f"at http://127.0.0.1:{port}/v1" in stderr


def test_cli_refuses_a_missing_model_in_one_line(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "minicpmv_edge.cli.main", "serve", str(tmp_path / "nothing")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and result.stderr.startswith("error: ") and len(result.stderr.splitlines()) == 1
