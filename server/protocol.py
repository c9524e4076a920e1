"""OpenAI's chat-completions request -> what the engine runs (messages in the runtime's form, with decoded
images, and the generation settings), and the engine's output -> OpenAI's response and chunk bodies.

Omitted sampling fields take the model card's published settings (temperature 0.7, top-p 0.8, top-k 100,
repetition penalty 1.05); `temperature: 0` decodes greedily, exactly as `chat(sampling=False)` does."""

from __future__ import annotations

import base64
import binascii
import io
import secrets
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from PIL import Image

from minicpmv_edge.runtime import Sampling
from minicpmv_edge.runtime.images import to_rgb
from minicpmv_edge.runtime.model import PUBLISHED_SAMPLING

from .errors import ApiError
from .output import Delta
from .settings import ServerSettings

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


def invalid(message: str, code: str = "invalid_request") -> ApiError:
    return ApiError(400, message, code)


@dataclass(frozen=True)
class GenerationJob:
    """What the engine runs for one request."""
    msgs: list[dict[str, Any]]
    max_tokens: int | None  # None: as many as the server's default and the context allow
    sampling: Sampling
    enable_thinking: bool = False
    max_slice_nums: int | None = None


@dataclass(frozen=True)
class ChatRequest:
    job: GenerationJob
    stream: bool = False
    include_usage: bool = False
    stop: tuple[str, ...] = ()
    created: int = field(default_factory=lambda: int(time.time()))
    id: str = field(default_factory=lambda: f"chatcmpl-{uuid.uuid4().hex}")


def _number(body: dict, name: str, kind: type, low: float | None = None, high: float | None = None) -> Any:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and not isinstance(value, int)):
        raise invalid(f"{name} must be {'an integer' if kind is int else 'a number'}, not {value!r}")
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = f"at least {low}" if high is None else f"between {low} and {high}"
        raise invalid(f"{name} must be {bounds}, not {value}")
    return kind(value)


def _flag(body: dict, name: str) -> bool | None:
    value = body.get(name)
    if value is not None and not isinstance(value, bool):
        raise invalid(f"{name} must be true or false, not {value!r}")
    return value


def _stops(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(stop, str) for stop in stops):
        raise invalid("stop must be a string or a list of strings")
    return tuple(stop for stop in stops if stop)


def _sampling(body: dict) -> Sampling:
    """`ignore_eos` (as llama.cpp's server takes it) generates max_tokens whatever the model says: benchmarks."""
    temperature = _number(body, "temperature", float, 0, 2)
    top_p = _number(body, "top_p", float, 0, 1)
    seed = _number(body, "seed", int)
    ignore_eos = bool(_flag(body, "ignore_eos"))
    if temperature == 0:
        return Sampling(temperature=0.0, ignore_eos=ignore_eos)
    return Sampling(temperature=PUBLISHED_SAMPLING["temperature"] if temperature is None else temperature,
                    top_p=PUBLISHED_SAMPLING["top_p"] if top_p is None else top_p, top_k=PUBLISHED_SAMPLING["top_k"],
                    repetition_penalty=PUBLISHED_SAMPLING["repetition_penalty"],
                    seed=secrets.randbits(31) if seed is None else seed % 2**32, ignore_eos=ignore_eos)


class ImageReader:
    """image_url -> an RGB image: `data:` URLs always; http(s) and local files only where the operator
    allowed them. Pixels are counted before anything is decoded."""

    def __init__(self, settings: ServerSettings):
        self.settings = settings

    def read(self, url: str) -> Image.Image:
        scheme = urlparse(url).scheme.lower()
        if scheme == "data":
            data = self._data_url(url)
        elif scheme in ("http", "https"):
            data = self._remote(url)
        elif scheme in ("file", ""):
            data = self._local(url)
        else:
            raise invalid(f"image_url must be a data: URL, not {scheme}:", "invalid_image")
        too_large = f"exceeds the server's limit of {self.settings.max_image_pixels:,} pixels"
        try:
            image = Image.open(io.BytesIO(data))
        except Image.DecompressionBombError:
            raise ApiError(413, f"the image {too_large}", "image_too_large") from None
        except (OSError, ValueError, SyntaxError) as e:  # what Pillow's format plugins raise on bad data
            raise invalid(f"image_url does not hold an image Pillow can read ({e.__class__.__name__})",
                          "invalid_image") from None
        if image.width * image.height > self.settings.max_image_pixels:
            raise ApiError(413, f"an image of {image.width}x{image.height} pixels {too_large}", "image_too_large")
        return to_rgb(image)

    @staticmethod
    def _data_url(url: str) -> bytes:
        header, comma, payload = url.partition(",")
        if not comma or not header.endswith(";base64"):
            raise invalid("a data: image_url must be base64 (data:image/png;base64,...)", "invalid_image")
        try:
            return base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise invalid("the data: image_url is not valid base64", "invalid_image") from None

    def _remote(self, url: str) -> bytes:
        if not self.settings.allow_remote_images:
            raise invalid("http(s) image URLs are off on this server (--allow-remote-images turns them on); "
                          "send the image as a data: URL", "remote_images_disabled")
        limit = self.settings.max_body_bytes
        try:
            with urllib.request.urlopen(url, timeout=self.settings.image_fetch_timeout_s) as response:
                data = response.read(limit + 1)
        except (urllib.error.URLError, OSError, ValueError) as e:
            raise invalid(f"cannot fetch the image at {url}: {e}", "image_fetch_failed") from None
        if len(data) > limit:
            raise ApiError(413, f"the image at {url} is larger than {limit:,} bytes", "image_too_large")
        return data

    def _local(self, url: str) -> bytes:
        folder = self.settings.local_image_dir
        if folder is None:
            raise invalid("image_url must be a data: URL (local paths are off on this server; --local-images DIR "
                          "allows files inside DIR)", "local_images_disabled")
        parsed = urlparse(url)
        path = Path(unquote(parsed.path) if parsed.scheme == "file" else url).expanduser()
        root = folder.resolve()
        path = (root / path).resolve()
        if not path.is_relative_to(root) or not path.is_file():
            raise invalid(f"image {url} is not a file inside the server's image folder", "image_not_found")
        if path.stat().st_size > self.settings.max_body_bytes:
            raise ApiError(413, f"image {url} is larger than {self.settings.max_body_bytes:,} bytes",
                           "image_too_large")
        return path.read_bytes()


def _content(number: int, content: Any, images: ImageReader) -> list[Any]:
    if content is None or isinstance(content, str):
        return [content or ""]
    if not isinstance(content, list):
        raise invalid(f"messages[{number}].content must be a string or a list of parts")
    parts: list[Any] = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            parts.append(part["text"])
        elif kind == "image_url":
            image_url = part.get("image_url")
            url = image_url.get("url") if isinstance(image_url, dict) else image_url
            if not isinstance(url, str):
                raise invalid(f"messages[{number}]: an image_url part needs image_url.url")
            parts.append(images.read(url))
        else:
            raise invalid(f"messages[{number}]: content parts are text or image_url, not {kind!r}")
    return parts


def parse_chat_request(body: Any, settings: ServerSettings) -> ChatRequest:
    """The request body (parsed JSON) checked and turned into the engine's job; images are decoded here,
    so a broken one is refused before it takes a place in the queue."""
    if not isinstance(body, dict):
        raise invalid("the request body must be a JSON object")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise invalid("messages is required: a non-empty list of {role, content}", "missing_messages")
    if body.get("n") not in (None, 1):
        raise invalid("n must be 1: this server returns one choice")
    images = ImageReader(settings)
    msgs = []
    for number, message in enumerate(messages):
        role = message.get("role") if isinstance(message, dict) else None
        if role not in ROLES:
            raise invalid(f"messages[{number}].role must be one of {', '.join(ROLES)}, not {role!r}")
        msgs.append({"role": ROLES[role], "content": _content(number, message.get("content"), images)})
    max_tokens = _number(body, "max_completion_tokens", int, 1)
    if max_tokens is None:
        max_tokens = _number(body, "max_tokens", int, 1)
    template_options = body.get("chat_template_kwargs")
    thinking = _flag(body, "enable_thinking")
    if thinking is None and isinstance(template_options, dict):
        thinking = _flag(template_options, "enable_thinking")
    stream_options = body.get("stream_options")
    if stream_options is not None and not isinstance(stream_options, dict):
        raise invalid("stream_options must be an object")
    return ChatRequest(
        GenerationJob(msgs, max_tokens, _sampling(body), bool(thinking), _number(body, "max_slice_nums", int, 1)),
        stream=bool(_flag(body, "stream")),
        include_usage=bool(stream_options and _flag(stream_options, "include_usage")),
        stop=_stops(body.get("stop")))


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_body(request: ChatRequest, model_id: str, answer: Delta, finish_reason: str,
                    counts: dict[str, int]) -> dict[str, Any]:
    message = {"role": "assistant", "content": answer.content}
    if answer.reasoning or request.job.enable_thinking:
        message["reasoning_content"] = answer.reasoning
    return {"id": request.id, "object": "chat.completion", "created": request.created, "model": model_id,
            "choices": [{"index": 0, "message": message, "finish_reason": finish_reason, "logprobs": None}],
            "usage": counts}


def chunk_body(request: ChatRequest, model_id: str, delta: dict[str, str] | None,
               finish_reason: str | None = None, counts: dict[str, int] | None = None) -> dict[str, Any]:
    """One chunk of a streamed answer; with `counts` (and no delta), the closing usage chunk."""
    choices = [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish_reason,
                                         "logprobs": None}]
    body: dict[str, Any] = {"id": request.id, "object": "chat.completion.chunk", "created": request.created,
                            "model": model_id, "choices": choices}
    if counts is not None:
        body["usage"] = counts
    return body


def delta_chunk(request: ChatRequest, model_id: str, delta: Delta) -> dict[str, Any]:
    fields = {"reasoning_content": delta.reasoning, "content": delta.content}
    return chunk_body(request, model_id, {name: text for name, text in fields.items() if text})
