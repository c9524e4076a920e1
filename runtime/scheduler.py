"""Several answers in flight on one llama.cpp context: continuous batching over the engine's sequences.

`Scheduler(model, n_parallel=N)` turns the model's engine into N sequences (`n_seq_max = N`, each with its
own KV stream, history and prefix reuse) and serves `submit(request) -> Handle` from any thread; iterating a
handle yields the same `GenerationResponse` records `Model.stream_generate` yields, and `cancel()` frees its
sequence at the next step.

Threads: the callers' threads only submit and read their handles' queues. A preparer thread lays prompts out
and encodes their image pieces (clip.cpp through the model's vision pipeline and caches) ahead of the decoder;
both threads' ggml work runs on the process's compute thread (compute.py), so a request's pieces and the
others' decode steps take turns, one piece or one step at a time, rather than fight over the cores. The engine
thread alone owns the llama.cpp context: each step decodes one token of every generating sequence together with
the next run of a waiting prompt (chunked to the batch size), as llama.cpp's server slots do, then samples every
sequence whose newest item was decoded with its own sampler chain. A sequence whose cache cannot be rewound
(a recurrent state) restarts alone; the others keep theirs."""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping, Sequence

import llama_cpp
import numpy as np

from .engine import EngineError, PositionPlan, Run, Sampling, SequenceSlot
from .model import DEFAULT_CONTEXT, Generation, GenerationResponse, Model
from .prompt import PromptItem

# Requests accepted but not yet given a sequence; beyond it `submit` raises QueueFull (a server's 503).
DEFAULT_QUEUE = 64
_IDLE_WAIT_S = 0.05  # how long an idle thread waits before looking at the stop flag again


class QueueFull(EngineError):
    """The scheduler already holds as many waiting requests as its queue bound allows."""


class SchedulerClosed(EngineError):
    """The scheduler was closed before the request finished."""


class ContextFull(EngineError):
    """The prompt (or, where the request asks, prompt and answer) needs more positions than a sequence may hold."""


@dataclass(frozen=True)
class GenerationRequest:
    """One answer to generate. `prompt` holds `Model.prepare`'s keyword arguments (system_prompt,
    enable_thinking, max_slice_nums, use_image_id, small_image_upsize, ...)."""

    msgs: Sequence[dict[str, Any]]
    max_new_tokens: int = 512
    sampling: Sampling = Sampling()
    prompt: Mapping[str, Any] = field(default_factory=dict)
    answer_must_fit: bool = False  # refuse (ContextFull) rather than end the answer early when the context is full


_END = object()  # ends a handle's records without a finish reason (cancelled, or the scheduler closed)


class Handle:
    """A submitted request: iterate it for its records (the last one has `finish_reason`); a failure of the
    request (bad input, a prompt too long for a sequence) is raised from the iteration."""

    def __init__(self, request: GenerationRequest):
        self.request = request
        self._records: queue.Queue = queue.Queue()
        self._cancelled = threading.Event()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def cancel(self) -> None:
        """Stop generating: the sequence is freed at the next step and the iteration ends now."""
        self._cancelled.set()
        self._records.put(_END)

    def __iter__(self) -> Iterator[GenerationResponse]:
        while True:
            record = self._records.get()
            if record is _END:
                return
            if isinstance(record, BaseException):
                raise record
            yield record
            if record.finish_reason:
                return

    def _put(self, record: GenerationResponse | BaseException) -> None:
        self._records.put(record)


@dataclass
class _Prepared:
    handle: Handle
    items: list[PromptItem]
    embeddings: dict[object, np.ndarray]  # the request's own pieces: the shared memory may evict them meanwhile
    plan: PositionPlan | None
    encode_ms: float


@dataclass
class _Active:
    """A request holding a sequence: prefilling while `position < len(items)`, then generating."""

    job: _Prepared
    slot: SequenceSlot
    reused: int  # prompt items the sequence's cache already held
    admitted: float
    position: int = 0  # the next prompt item to decode
    answer: Generation | None = None
    token: int | None = None  # sampled, to be decoded at the next step

    def __post_init__(self) -> None:
        self.position = self.reused


class Scheduler:
    """N sequences of `model`'s engine served by one engine thread (see the module docstring). While it is
    open, the model's own `stream_generate`/`chat` must not be used; `close()` gives the engine back as one
    sequence. A context manager."""

    def __init__(self, model: Model, *, n_parallel: int, n_ctx: int = DEFAULT_CONTEXT, max_ctx: int | None = None,
                 max_queue: int = DEFAULT_QUEUE):
        """`n_ctx` positions per sequence to start with; a request needing more makes every sequence grow
        (doubling) up to `max_ctx` (default: the model's training context; a server that promises a context passes
        it, so nothing grows)."""
        if n_parallel < 1:
            raise ValueError(f"n_parallel must be at least 1, not {n_parallel}")
        self.model, self.engine = model, model.engine
        trained = llama_cpp.llama_model_n_ctx_train(model.engine.model)
        self._max_ctx = min(max_ctx or trained, trained)
        self._single_ctx = self.engine.n_ctx
        self.engine.configure(n_ctx=n_ctx, n_seq_max=n_parallel)
        self._submitted: queue.Queue[Handle] = queue.Queue(maxsize=max_queue)
        self._prepared: queue.Queue[_Prepared] = queue.Queue(maxsize=n_parallel)
        self._active: list[_Active] = []
        self._held: _Prepared | None = None  # waits for every sequence to be idle so the context can grow
        self._last_used = [0.0] * n_parallel
        self._stopping = threading.Event()
        self._threads = [threading.Thread(target=self._prepare_loop, name="minicpmv-prepare", daemon=True),
                         threading.Thread(target=self._engine_loop, name="minicpmv-engine", daemon=True)]
        for thread in self._threads:
            thread.start()

    @property
    def n_parallel(self) -> int:
        return self.engine.n_seq_max

    def submit(self, request: GenerationRequest) -> Handle:
        if self._stopping.is_set():
            raise SchedulerClosed("the scheduler is closed")
        handle = Handle(request)
        try:
            self._submitted.put_nowait(handle)
        except queue.Full:
            raise QueueFull(f"{self._submitted.maxsize} requests are already waiting") from None
        return handle

    def cancel(self, handle: Handle) -> None:
        handle.cancel()

    def close(self) -> None:
        if self._stopping.is_set():
            return
        self._stopping.set()
        for thread in self._threads:
            thread.join()
        closed = SchedulerClosed("the scheduler was closed before the answer finished")
        for active in self._active:
            self._finish(active, closed)
        if self._held is not None:
            self._held.handle._put(closed)
        for waiting in (self._prepared, self._submitted):
            while not waiting.empty():
                job = waiting.get_nowait()
                (job.handle if isinstance(job, _Prepared) else job)._put(closed)
        self.engine.configure(n_ctx=self._single_ctx, n_seq_max=1)

    def __enter__(self) -> "Scheduler":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # ---- the preparer thread ----------------------------------------------------------------------------

    def _prepare_loop(self) -> None:
        while not self._stopping.is_set():
            try:
                handle = self._submitted.get(timeout=_IDLE_WAIT_S)
            except queue.Empty:
                continue
            if handle.cancelled:
                continue
            try:
                items, encode_ms = self.model.prepare(handle.request.msgs, **handle.request.prompt)
                keys = {item[0] for item in items if not isinstance(item, int)}
                job = _Prepared(handle, items, {key: self.model.embeddings[key] for key in keys},
                                self.model.position_plan(items), encode_ms)
            except Exception as e:  # noqa: BLE001 - the request's failure belongs to its caller, raised there
                handle._put(e)
                continue
            while not self._stopping.is_set():
                try:
                    self._prepared.put(job, timeout=_IDLE_WAIT_S)
                    break
                except queue.Full:
                    continue
            else:
                handle._put(SchedulerClosed("the scheduler was closed before the answer started"))

    # ---- the engine thread ------------------------------------------------------------------------------

    def _engine_loop(self) -> None:
        try:
            while not self._stopping.is_set():
                self._active = [active for active in self._active if not self._dropped_if_cancelled(active)]
                self._admit()
                if self._active:
                    self._step()
        except BaseException as e:  # a defect: every caller hears of it rather than waiting forever
            self._stopping.set()
            for active in self._active:
                self._finish(active, e)
            self._active = []
            raise

    def _dropped_if_cancelled(self, active: _Active) -> bool:
        if active.job.handle.cancelled:
            self._finish(active, None)
            return True
        return False

    def _admit(self) -> None:
        """Give waiting requests the free sequences; wait a little for one when nothing is active. A request
        whose prompt and answer need more than a sequence holds waits, admitting no other, until every sequence
        is idle; then the context grows for all of them (rebuilding it drops their caches)."""
        while len(self._active) < self.n_parallel:
            job, self._held = self._held, None
            if job is None:
                try:
                    job = (self._prepared.get(timeout=_IDLE_WAIT_S) if not self._active
                           else self._prepared.get_nowait())
                except queue.Empty:
                    return
            if job.handle.cancelled:
                continue
            request = job.handle.request
            needed = len(job.items) + request.max_new_tokens
            if needed > self.engine.n_ctx and self.engine.n_ctx < self._max_ctx:
                if self._active:
                    self._held = job
                    return
                self._grow(needed)
            try:
                if len(job.items) >= self.engine.n_ctx or (request.answer_must_fit and needed > self.engine.n_ctx):
                    raise ContextFull(f"the prompt needs {len(job.items)} positions and the answer up to "
                                      f"{request.max_new_tokens} more; a sequence holds {self.engine.n_ctx}")
                slot = self._free_slot(job.items)
                start = self.engine.rewind(slot, job.items, job.embeddings, job.plan)
            except EngineError as e:
                job.handle._put(e)
                continue
            self._active.append(_Active(job, slot, start, time.perf_counter()))

    def _grow(self, needed: int) -> None:
        """Rebuild the context with longer sequences (every cache is dropped: only while none is active)."""
        size = self.engine.n_ctx
        while size < needed:
            size *= 2
        self.engine.configure(n_ctx=min(size, self._max_ctx), n_seq_max=self.n_parallel)

    def _free_slot(self, items: Sequence[PromptItem]) -> SequenceSlot:
        """The free sequence whose cache holds most of `items` as a prefix when that is over half of them (a
        follow-up turn finds its conversation), else the free one unused longest (keeping other caches for
        their own follow-ups)."""
        busy = {active.slot.seq_id for active in self._active}
        free = [slot for slot in self.engine.slots if slot.seq_id not in busy]
        best = max(free, key=lambda slot: slot.shared_prefix(items))
        if 2 * best.shared_prefix(items) > len(items):
            return best
        return min(free, key=lambda slot: self._last_used[slot.seq_id])

    def _step(self) -> None:
        """One batch: a token of every generating sequence, then prompt runs up to the batch size."""
        by_kind: dict[bool, list[tuple[_Active, Run]]] = {False: [], True: []}
        budget = self.engine.n_batch
        for active in self._active:
            if active.answer is not None:
                run = self.engine.next_token_run(active.slot, active.token)
                by_kind[run.as_embeddings].append((active, run))
                budget -= 1
        for active in self._active:
            if active.answer is None and budget > 0:
                items = active.job.items
                run = Run(active.slot, items, active.position,
                          self.engine.run_end(active.slot, items, active.position, budget))
                by_kind[run.as_embeddings].append((active, run))
                budget -= run.end - run.start
                active.position = run.end
        for batch in by_kind.values():
            if not batch:
                continue
            try:
                self.engine.decode([run for _, run in batch])
            except EngineError as e:
                for active, _ in batch:
                    self._finish(active, e)
                    self.engine.rewind(active.slot, [], {})
                self._active = [active for active in self._active if all(active is not a for a, _ in batch)]
                continue
            # Sampling reads this batch's logits, so it happens before the next batch is decoded.
            for active, run in batch:
                if run.end == len(run.items):
                    self._emit(active)
        self._active = [active for active in self._active if active.answer is None or active.token is not None]

    def _emit(self, active: _Active) -> None:
        if active.answer is None:
            job = active.job
            decoded = len(job.items) - active.reused
            request = job.handle.request
            # A sequence cannot grow while others hold the context: the answer ends ("length") where it is full.
            room = self.engine.n_ctx - len(job.items)
            active.answer = Generation(self.engine, request.sampling, min(request.max_new_tokens, room),
                                       len(job.items), job.encode_ms,
                                       decoded / max(time.perf_counter() - active.admitted, 1e-9))
        record = active.answer.next_record(active.slot)
        active.job.handle._put(record)
        if record.finish_reason:
            self._finish(active, None)
            active.token = None
        else:
            active.token = record.token

    def _finish(self, active: _Active, error: BaseException | None) -> None:
        if active.answer is not None:
            active.answer.close()
        if error is not None:
            active.job.handle._put(error)
        self._last_used[active.slot.seq_id] = time.perf_counter()
