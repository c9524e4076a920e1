"""The ASGI app (Starlette) and how to run it (uvicorn): `POST /v1/chat/completions` (whole or streamed as
server-sent events), `GET /v1/models`, `GET /health`. Every refusal is an OpenAI-shaped JSON error and the
server goes on; a client that leaves stops its generation."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hmac
import json
import logging
import socket
import threading
import time
from typing import Any, AsyncIterator, Awaitable, Callable

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from minicpmv_edge.runtime import Model

from .backend import DONE, EngineBackend, Started, Ticket
from .errors import ApiError, as_api_error
from .output import AnswerShaper, Delta
from .protocol import ChatRequest, chunk_body, completion_body, delta_chunk, parse_chat_request, usage
from .settings import ServerSettings

log = logging.getLogger("minicpmv_edge.server")
Backend = EngineBackend  # what create_app drives: submit(job, loop) -> Ticket, stats(), close(), model_id


def _backend_for(model: Model, settings: ServerSettings) -> Backend:
    return EngineBackend(model, parallel=settings.parallel, max_queue=settings.max_queue, context=settings.context,
                         default_max_tokens=settings.default_max_tokens)


async def _read_json(request: Request, limit: int) -> Any:
    too_large = ApiError(413, f"the request body exceeds the server's limit of {limit:,} bytes", "request_too_large")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise too_large
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise ApiError(400, f"the request body is not valid JSON: {e}", "invalid_json") from None


async def _cancel_when_client_leaves(request: Request, ticket: Ticket) -> None:
    """The body is read, so the next message uvicorn delivers is the disconnect."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
    ticket.cancel()


class _Generation:
    """One admitted request's answer as deltas, whether streamed or whole."""

    def __init__(self, chat: ChatRequest, ticket: Ticket, started: Started):
        self.chat, self.ticket = chat, ticket
        self.shaper = AnswerShaper(chat.stop, chat.job.enable_thinking)
        self.prompt_tokens, self.completion_tokens = started.prompt_tokens, 0
        self.finish_reason = "length"

    async def deltas(self) -> AsyncIterator[Delta]:
        while (event := await self.ticket.next()) is not DONE:
            if isinstance(event, BaseException):
                raise event
            self.completion_tokens = event.generation_tokens
            delta = self.shaper.push(event.text)
            if delta:
                yield delta
            if self.shaper.stopped:
                self.ticket.cancel()  # the rest would be cut anyway
                self.finish_reason = "stop"
                break
            self.finish_reason = event.finish_reason or self.finish_reason
        if self.ticket.cancelled and not self.shaper.stopped:
            return  # the client left or the server is stopping: nothing more goes out
        rest = self.shaper.finish()
        if rest:
            yield rest

    @property
    def usage(self) -> dict[str, int]:
        return usage(self.prompt_tokens, self.completion_tokens)


Endpoint = Callable[[Request], Awaitable[Response]]


def _openai_errors(retry_after_s: int) -> Callable[[Endpoint], Endpoint]:
    """Any exception of an endpoint becomes its OpenAI-shaped JSON response; unexpected ones are logged."""

    def wrap(endpoint: Endpoint) -> Endpoint:
        @functools.wraps(endpoint)
        async def guarded(request: Request) -> Response:
            try:
                return await endpoint(request)
            except Exception as error:  # noqa: BLE001 - every failure answers the client, the server goes on
                api_error = as_api_error(error, retry_after_s)
                if api_error.code == "internal_error":
                    log.error("request failed", exc_info=error)
                return api_error.response()

        return guarded

    return wrap


def _sse(body: Any) -> str:
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"


def create_app(model: Model | Backend, settings: ServerSettings = ServerSettings()) -> Starlette:
    """The server's ASGI app over a loaded `Model` (served by a backend the app closes on shutdown, which
    gives the model back as a single-sequence model) or over a backend the caller owns."""
    owned = isinstance(model, Model)
    backend = _backend_for(model, settings) if owned else model
    model_name = settings.model_id or backend.model_id
    started_at = int(time.time())
    guarded = _openai_errors(settings.retry_after_s)

    def authorize(request: Request) -> None:
        if settings.api_key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), settings.api_key.encode()):
            raise ApiError(401, "a valid API key is required: Authorization: Bearer <key>", "invalid_api_key",
                           kind="authentication_error")

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok", "model": model_name, **backend.stats()})

    @guarded
    async def models(request: Request) -> Response:
        authorize(request)
        return JSONResponse({"object": "list", "data": [
            {"id": model_name, "object": "model", "created": started_at, "owned_by": "minicpmv-edge"}]})

    @guarded
    async def chat_completions(request: Request) -> Response:
        authorize(request)
        body = await _read_json(request, settings.max_body_bytes)
        chat = await run_in_threadpool(parse_chat_request, body, settings)
        ticket = backend.submit(chat.job, asyncio.get_running_loop())
        watcher = asyncio.create_task(_cancel_when_client_leaves(request, ticket))
        streaming = False
        try:
            first = await ticket.next()
            if isinstance(first, BaseException):
                raise first
            if first is DONE:
                return Response(status_code=499)  # the client left while waiting: nobody reads this
            generation = _Generation(chat, ticket, first)
            if chat.stream:
                streaming = True
                return StreamingResponse(stream(generation, watcher), media_type="text/event-stream",
                                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
            answer = Delta()
            async for delta in generation.deltas():
                answer.reasoning += delta.reasoning
                answer.content += delta.content
            return JSONResponse(completion_body(chat, model_name, answer, generation.finish_reason, generation.usage))
        finally:
            if not streaming:
                watcher.cancel()
                ticket.cancel()

    async def stream(generation: _Generation, watcher: asyncio.Task) -> AsyncIterator[str]:
        chat = generation.chat
        try:
            yield _sse(chunk_body(chat, model_name, {"role": "assistant", "content": ""}))
            try:
                async for delta in generation.deltas():
                    yield _sse(delta_chunk(chat, model_name, delta))
            except Exception as error:  # noqa: BLE001 - the status is sent: the error goes in the stream
                yield _sse(as_api_error(error).body())
            else:
                if generation.ticket.cancelled and not generation.shaper.stopped:
                    return
                yield _sse(chunk_body(chat, model_name, {}, generation.finish_reason))
                if chat.include_usage:
                    yield _sse(chunk_body(chat, model_name, None, counts=generation.usage))
            yield "data: [DONE]\n\n"
        finally:
            watcher.cancel()
            generation.ticket.cancel()

    async def on_http_error(request: Request, error: HTTPException) -> Response:
        code = {404: "not_found", 405: "method_not_allowed"}.get(error.status_code, "http_error")
        return ApiError(error.status_code, str(error.detail), code).response()

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        if owned:
            await run_in_threadpool(backend.close)

    return Starlette(
        routes=[Route("/health", health), Route("/v1/models", models),
                Route("/v1/chat/completions", chat_completions, methods=["POST"])],
        exception_handlers={HTTPException: on_http_error},
        lifespan=lifespan)


def _uvicorn_config(app: Starlette, host: str, port: int, log_level: str):  # noqa: ANN202 - uvicorn.Config
    import uvicorn

    return uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)


def serve(model: Model | Backend, settings: ServerSettings = ServerSettings(), *, log_level: str = "info") -> None:
    """Serve until interrupted (Ctrl-C / SIGTERM)."""
    import uvicorn

    uvicorn.Server(_uvicorn_config(create_app(model, settings), settings.host, settings.port, log_level)).run()


class BackgroundServer:
    """The app served by uvicorn on a thread of this process (tests, notebooks, benchmarks); `url` is the
    API's base (`http://host:port/v1`). A context manager; `stop()` waits for the server to finish."""

    def __init__(self, model: Model | Backend, settings: ServerSettings = ServerSettings(), *,
                 log_level: str = "warning"):
        import uvicorn

        port = settings.port or _free_port(settings.host)
        self.url = f"http://{settings.host}:{port}/v1"
        self._server = uvicorn.Server(_uvicorn_config(create_app(model, settings), settings.host, port, log_level))
        self._thread = threading.Thread(target=self._server.run, name="minicpmv-server", daemon=True)
        self._thread.start()
        while not self._server.started:
            if not self._thread.is_alive():
                raise RuntimeError(f"the server could not start on {settings.host}:{port}")
            time.sleep(0.01)

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join()

    def __enter__(self) -> "BackgroundServer":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def _free_port(host: str) -> int:
    with socket.socket() as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]
