"""What an operator chooses when starting the server: where it listens, who may call it, and the limits that
keep one bad or greedy request from hurting the others."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ServerSettings:
    host: str = "127.0.0.1"  # loopback unless the operator opens it
    port: int = 8000
    api_key: str | None = None  # when set, /v1/* needs `Authorization: Bearer <key>`
    model_id: str | None = None  # the name /v1/models reports; default: the model file's name
    max_body_bytes: int = 32 << 20  # a few dense pages as base64 data URLs
    max_image_pixels: int = 20_000_000  # per image; an A4 page at 400 dpi is ~15.5 MP
    parallel: int = 2  # answers generated together (sequences of the engine), each with `context` positions
    max_queue: int = 8  # requests waiting for a sequence (at least 1); beyond them 503
    context: int = 4096  # per request: prompt + max_tokens (capped by the model's training context)
    default_max_tokens: int = 1024  # when a request names none (less if the context has less room)
    allow_remote_images: bool = False  # image_url with http(s):// (the server fetches them)
    local_image_dir: Path | None = None  # image_url with file:// or a path, only inside this folder
    image_fetch_timeout_s: float = 10.0
    retry_after_s: int = 2  # the Retry-After of a 503 when the queue is full
