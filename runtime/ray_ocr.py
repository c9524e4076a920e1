"""Batch OCR on a Ray cluster (`minicpmv ocr --ray ADDRESS`): a pool of Ray actors, each holding one model.

The driver does what it does locally (expands the inputs, keeps the job store, writes the JSONL) and renders
each page itself, so the inputs need to exist on the driver only: a page travels to a worker as lossless PNG
bytes, and its record comes back to the driver, which alone writes it. The pool is Ray actors driven
directly rather than Ray Data's `map_batches`, for three guarantees Ray Data makes awkward: a page whose
worker keeps dying must end as a failed record with its reason (Ray Data's actor pools retry such a task
forever by default, and with a limit the whole dataset fails); pages are rendered lazily with a bounded
number in flight (`from_items` would hold every rendered page of the batch at once); and the job keys need
the identity of the model the workers loaded before the first page is sent.

Faults are Ray's to handle: an actor whose process dies is restarted (`max_restarts=-1`) and reloads its
model, and the pages it held are run again there (`max_task_retries`); a page that has killed its worker
`1 + TASK_RETRIES` times is recorded failed. Each page is one actor task whose result the driver takes once,
so a page that a retry ran twice still reaches the JSONL once. A worker that cannot load the model (a node
without the files) is left out with one line; one that comes back from a restart without it, or does not come
back, fails the pages it held with the reason and gets no more. Ray is imported only when a RayPool is made."""

from __future__ import annotations

import io
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

from PIL import Image

from .embedding_cache import DEFAULT_MEMORY_BYTES
from .engine import EngineError
from .model import Model, load
from .ocr import (PAGE_ERRORS, ModelFacts, OcrInputError, OcrOptions, PageRunner, PageTask, failed_page,
                  ocr_page, page_record, render_page)
from .vision import VisionError

INSTALL_HINT = "--ray needs Ray: pip install 'minicpmv-edge[ray]'"
# A page whose worker process dies this many times more is recorded failed instead of killing workers forever.
TASK_RETRIES = 2
# Pages queued on a worker beside the one it runs, so that it never waits for the driver to render the next.
QUEUED_PER_WORKER = 1


def import_ray():  # noqa: ANN201 - the ray module
    """Ray, or an OcrInputError saying in one line how to install it."""
    try:
        import ray
    except ImportError:
        raise OcrInputError(INSTALL_HINT) from None
    return ray


@dataclass(frozen=True)
class WorkerState:
    """What a worker says of itself: where it runs, and its model's facts or why it has no model."""

    node: str  # host and process
    pid: int
    facts: ModelFacts | None
    error: str | None


class PageWorker:
    """A Ray actor's state: one model, loaded when the actor (re)starts. A load failure is kept as its reason,
    so that the actor stays up and can say why it holds no model."""

    def __init__(self, model: Sequence[str], n_threads: int, embedding_memory_bytes: int):
        self.node = f"{socket.gethostname()} (pid {os.getpid()})"
        self.model: Model | None = None
        self.error: str | None = None
        try:
            self.model = load(*model, n_threads=n_threads, embedding_memory_bytes=embedding_memory_bytes)
        except (EngineError, VisionError, OSError) as e:
            self.error = f"the worker on {self.node} cannot load the model: {' '.join(str(e).split())}"

    def state(self) -> WorkerState:
        return WorkerState(self.node, os.getpid(), self.model and ModelFacts.of(self.model), self.error)

    def ocr(self, task: PageTask, png: bytes, options: OcrOptions, job_model: ModelFacts) -> tuple[str, dict, bool]:
        """(status, record, whether this worker can take more pages)."""
        reason = _unfit(self.state(), job_model)
        if reason is not None:  # this worker came back from a restart without the job's model
            return (*failed_page(page_record(task, job_model, options), reason, time.perf_counter()), False)
        return (*ocr_page(self.model, task, options, Image.open(io.BytesIO(png)).convert("RGB")), True)


def _unfit(state: WorkerState, job_model: ModelFacts) -> str | None:
    """Why a worker cannot take the job's pages, or None."""
    if state.facts is None:
        return state.error
    if state.facts != job_model:
        return f"the worker on {state.node} holds the model {state.facts.identity}, not the job's {job_model.identity}"
    return None


def _png(task: PageTask, dpi: int) -> bytes:
    buffer = io.BytesIO()
    render_page(task.ref, dpi).save(buffer, "PNG", compress_level=1)  # lossless: the worker sees the local pixels
    return buffer.getvalue()


def _model_arguments(model: str | Path | Sequence[str | Path]) -> list[str]:
    """MODEL as every node resolves it: a path that exists here made absolute (workers do not share the
    driver's working folder), anything else (a hub spec, a path only the workers have) as given."""
    given = [model] if isinstance(model, (str, Path)) else list(model)
    return [str(Path(m).expanduser().resolve()) if Path(m).expanduser().exists() else str(m) for m in given]


class RayPool:
    """A `PagePool` of Ray actors for `run_batch`. `address` is Ray's: "auto" (the cluster `ray start` made this
    machine part of), "host:port" of the head, "local" (a private instance here), None (an existing cluster if
    there is one, else a private instance). `workers` defaults to the cluster's CPUs divided by
    `threads` (each worker reserves `threads` CPUs). `on_message` receives a line for each worker left out.
    A context manager; `close` ends the actors, and the Ray connection if the pool made it."""

    def __init__(self, model: str | Path | Sequence[str | Path], *, address: str | None = None,
                 workers: int | None = None, threads: int = 1, embedding_memory_bytes: int = DEFAULT_MEMORY_BYTES,
                 on_message: Callable[[str], None] | None = None):
        self.ray = import_ray()
        self.model, self.address, self.workers, self.threads = _model_arguments(model), address, workers, threads
        self.embedding_memory_bytes = embedding_memory_bytes
        self.on_message = on_message or (lambda line: None)
        self.actors: list = []  # Ray actor handles, once started
        self.states: list[WorkerState] = []  # what each worker said when it started
        self._connected_here = False

    def __enter__(self) -> "RayPool":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self, options: OcrOptions) -> tuple[ModelFacts, PageRunner]:
        ray = self.ray
        if not ray.is_initialized():
            try:
                ray.init(address=self.address, log_to_driver=False, logging_level="WARNING")
            except (ConnectionError, ValueError, RuntimeError) as e:
                raise OcrInputError(f"cannot reach the Ray cluster: {' '.join(str(e).split())}") from None
            except SystemExit:  # what ray.init does when no GCS answers at the address (after its own log lines)
                raise OcrInputError(f"cannot reach the Ray cluster at {self.address}") from None
            self._connected_here = True
        cpus = int(ray.cluster_resources().get("CPU", 0))
        workers = self.workers or max(1, cpus // self.threads)
        if workers * self.threads > cpus:  # Ray would wait for the missing CPUs for ever
            raise OcrInputError(f"{workers} workers of {self.threads} thread{'s' if self.threads > 1 else ''} need "
                                f"{workers * self.threads} CPUs; the Ray cluster has {cpus}")
        # SPREAD: one node's memory bandwidth bounds its decoders, so workers go to as many nodes as there are.
        actor = ray.remote(num_cpus=self.threads, max_restarts=-1, max_task_retries=TASK_RETRIES,
                           scheduling_strategy="SPREAD")(PageWorker)
        self.actors = [actor.remote(self.model, self.threads, self.embedding_memory_bytes) for _ in range(workers)]
        self.states = states = ray.get([a.state.remote() for a in self.actors])
        facts = next((s.facts for s in states if s.facts is not None), None)
        if facts is None:
            raise OcrInputError(f"no Ray worker could load the model; {states[0].error}")
        fit = []
        for actor, state in zip(self.actors, states):
            reason = _unfit(state, facts)
            if reason is None:
                fit.append(actor)
            else:
                self.on_message(f"{reason}; going on without it")
        return facts, lambda tasks: self._run(tasks, options, facts, fit)

    def _run(self, tasks: Iterable[PageTask], options: OcrOptions, facts: ModelFacts,
             actors: list) -> Iterator[tuple[PageTask, str, dict]]:
        """Keep every usable worker busy with `1 + QUEUED_PER_WORKER` pages; yield each record as it returns.
        A worker whose page ended with its death is asked for its state before it gets another page: it is
        back once Ray has restarted it with the model, and left out if it is gone or came back without it."""
        ray = self.ray
        tasks = iter(tasks)
        in_flight: dict = {}  # ObjectRef -> (task, actor); the task is None for a state probe
        busy = {actor: 0 for actor in actors}  # pages in flight per worker
        usable = set(actors)
        exhausted = False
        while True:
            for actor in [a for a in actors if a in usable]:
                while not exhausted and busy[actor] <= QUEUED_PER_WORKER:
                    task = next(tasks, None)
                    if task is None:
                        exhausted = True
                        break
                    started = time.perf_counter()
                    try:
                        png = _png(task, options.dpi)
                    except PAGE_ERRORS as e:  # the page's own fault, found on the driver: no worker needed
                        yield (task, *failed_page(page_record(task, facts, options), e, started))
                        continue
                    in_flight[actor.ocr.remote(task, png, options, facts)] = (task, actor)
                    busy[actor] += 1
            if not in_flight:
                for task in tasks:  # left only when no usable worker is: each page fails with the reason
                    yield (task, *failed_page(page_record(task, facts, options),
                                              "no Ray worker holding the job's model is left", time.perf_counter()))
                return
            [done], _ = ray.wait(list(in_flight), num_returns=1)
            task, actor = in_flight.pop(done)
            if task is None:
                self._probed(done, actor, facts, usable)
                continue
            busy[actor] -= 1
            try:
                status, record, can_go_on = ray.get(done)
            except ray.exceptions.RayActorError as e:
                status, record = failed_page(page_record(task, facts, options), f"its Ray worker died running it "
                                             f"(tried {1 + TASK_RETRIES} times at most): {_first_line(e)}",
                                             time.perf_counter())
                if actor in usable:
                    usable.discard(actor)
                    in_flight[actor.state.remote()] = (None, actor)
                can_go_on = True
            if not can_go_on and actor in usable:
                usable.discard(actor)
                self.on_message(f"{record['error']}; going on without it")
            yield task, status, record

    def _probed(self, probe: object, actor: object, facts: ModelFacts, usable: set) -> None:
        """A died worker's state: back among the usable ones, or left out with one line."""
        try:
            reason = _unfit(self.ray.get(probe), facts)
        except self.ray.exceptions.RayActorError as e:
            reason = f"a Ray worker is gone: {_first_line(e)}"
        if reason is None:
            usable.add(actor)
        else:
            self.on_message(f"{reason}; going on without it")

    def close(self) -> None:
        for actor in self.actors:
            self.ray.kill(actor)
        self.actors = []
        if self._connected_here:
            self.ray.shutdown()
            self._connected_here = False


def _first_line(error: Exception) -> str:
    return next((line.strip().rstrip(".") for line in str(error).splitlines() if line.strip()), type(error).__name__)
