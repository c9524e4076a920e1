"""One OS thread runs every ggml computation of the process: llama_decode, clip.cpp's and mtmd's encodes, our
vision graph. Other threads hand the call over and wait for its result.

Why: llama-cpp-python builds ggml's CPU backend with OpenMP, which keeps a team of worker threads for every OS
thread that has computed. While a second such team is alive, each of ggml's many barriers per graph ends in a
sleep and a wake-up instead of a short spin. Measured on the full-size 4.6 Q4_K_M pair (2 cores, 128 tokens
after a 1,417-token prompt): decoding on a thread started after the main thread had decoded ran at 13.1 tok/s
against 20.3 on the main thread alone. That was the scheduler's case (clip.cpp on its preparer thread, llama.cpp
on its engine thread) and so the server's: one request through `minicpmv serve` took 1.15x `minicpmv ocr`'s time.

A caller interrupted while it waits (Ctrl-C) still waits for the computation to end before the interrupt goes
on, as it would have had it computed itself: its buffers and contexts stay valid while ggml uses them."""

from __future__ import annotations

import queue
import threading
from concurrent.futures import Future
from typing import Callable, TypeVar

T = TypeVar("T")

_jobs: queue.SimpleQueue = queue.SimpleQueue()
_start_lock = threading.Lock()
_thread: threading.Thread | None = None


def _serve() -> None:
    while True:
        future, fn, args = _jobs.get()
        if future.set_running_or_notify_cancel():
            try:
                future.set_result(fn(*args))
            except BaseException as e:  # noqa: BLE001 - the caller re-raises it
                future.set_exception(e)


def _compute_thread() -> threading.Thread:
    global _thread
    with _start_lock:
        if _thread is None:
            _thread = threading.Thread(target=_serve, name="minicpmv-compute", daemon=True)
            _thread.start()
    return _thread


def on_compute_thread(fn: Callable[..., T], *args: object) -> T:
    """`fn(*args)` run on the compute thread (directly when called there); its result, or its exception."""
    thread = _compute_thread()
    if threading.current_thread() is thread:
        return fn(*args)
    if not thread.is_alive():  # interpreter shutdown: daemon threads are gone, and nothing else computes
        return fn(*args)
    future: Future = Future()
    _jobs.put((future, fn, args))
    interrupt: BaseException | None = None
    while True:
        try:
            future.exception()  # waits
            break
        except KeyboardInterrupt as e:
            interrupt = e
    if interrupt is not None:
        raise interrupt
    return future.result()
