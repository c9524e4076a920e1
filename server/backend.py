"""The one place the server meets the engine. `EngineBackend.submit(job, loop)` hands a request to the
runtime's multi-sequence `Scheduler` (up to `parallel` answers decode together, each on its own sequence
with its own prefix reuse; more wait in its bounded queue, beyond which `QueueFullError`) and returns a
`Ticket` whose events arrive in the request's event loop: `Started` (the prompt is decoded and fits), the
runtime's `GenerationResponse` records, then `DONE`, or the exception that ended the request.
`Ticket.cancel()` (a client gone, a stop sequence reached) frees the request's sequence at the next step."""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass
from typing import Any, Callable, Union

import llama_cpp

from minicpmv_edge.runtime import GenerationResponse, Model
from minicpmv_edge.runtime.scheduler import (ContextFull, GenerationRequest, Handle, QueueFull, Scheduler,
                                             SchedulerClosed)

from .errors import ContextLimitError, QueueFullError
from .protocol import GenerationJob


@dataclass(frozen=True)
class Started:
    prompt_tokens: int


DONE = object()  # the last event of every ticket: after the final record, an error, or a cancel
Event = Union[Started, GenerationResponse, BaseException, object]


class Ticket:
    """One admitted request. The engine side calls `emit` from any thread; the request side awaits
    `next()` in its event loop and may `cancel()` there."""

    def __init__(self, job: GenerationJob, loop: asyncio.AbstractEventLoop, on_cancel: Callable[[], None]):
        self.job, self._loop, self._on_cancel = job, loop, on_cancel
        self._events: asyncio.Queue[Event] = asyncio.Queue()
        self.cancelled = False

    def emit(self, event: Event) -> None:
        try:
            self._loop.call_soon_threadsafe(self._events.put_nowait, event)
        except RuntimeError:  # the loop is closed: nobody waits for this request any more
            self.cancelled = True

    async def next(self) -> Event:
        return await self._events.get()

    def cancel(self) -> None:
        if not self.cancelled:
            self.cancelled = True
            self._on_cancel()
            self._events.put_nowait(DONE)


def model_id(model: Model) -> str:
    """The model file's name without .gguf: `identity` starts with it."""
    return model.identity.split(":", 1)[0].removesuffix(".gguf")


class EngineBackend:
    """A `Model` served through the runtime's scheduler; one relay thread per request carries its records
    (the scheduler's handles are blocking iterators) into the request's event loop. `close()` gives the
    model back as a single-sequence model."""

    def __init__(self, model: Model, *, parallel: int, max_queue: int, context: int, default_max_tokens: int):
        self.model_id = model_id(model)
        self.parallel, self.max_queue, self.default_max_tokens = parallel, max_queue, default_max_tokens
        self.context = min(context, llama_cpp.llama_model_n_ctx_train(model.engine.model))
        self.scheduler = Scheduler(model, n_parallel=parallel, n_ctx=self.context, max_ctx=self.context,
                                   max_queue=max_queue)
        self._lock = threading.Lock()
        self._requests = 0

    def submit(self, job: GenerationJob, loop: asyncio.AbstractEventLoop) -> Ticket:
        # An explicit max_tokens must fit beside the prompt (refused before any decoding); the default one
        # ends early where the context is full.
        request = GenerationRequest(job.msgs, job.max_tokens or self.default_max_tokens, job.sampling,
                                    {"enable_thinking": job.enable_thinking, "max_slice_nums": job.max_slice_nums},
                                    answer_must_fit=job.max_tokens is not None)
        try:
            handle = self.scheduler.submit(request)
        except QueueFull:
            raise QueueFullError(f"all {self.max_queue} places in the queue are taken; retry shortly") from None
        except SchedulerClosed:
            raise QueueFullError("the server is shutting down") from None
        ticket = Ticket(job, loop, handle.cancel)
        with self._lock:
            self._requests += 1
        threading.Thread(target=self._relay, args=(ticket, handle), name="minicpmv-server-relay", daemon=True).start()
        return ticket

    def stats(self) -> dict[str, Any]:
        """`requests`: admitted and not finished (generating or waiting)."""
        return {"requests": self._requests, "parallel": self.parallel, "max_queue": self.max_queue,
                "context": self.context}

    def close(self) -> None:
        self.scheduler.close()

    def _relay(self, ticket: Ticket, handle: Handle) -> None:
        try:
            for number, record in enumerate(handle):
                if number == 0:
                    ticket.emit(Started(record.prompt_tokens))
                ticket.emit(record)
        except SchedulerClosed:
            ticket.emit(QueueFullError("the server is shutting down"))
        except ContextFull as error:
            ticket.emit(ContextLimitError(f"{error}; ask for fewer max_tokens"))
        except Exception as error:  # noqa: BLE001 - the request's failure is its client's answer
            ticket.emit(error)
        finally:
            with self._lock:
                self._requests -= 1
        ticket.emit(DONE)
