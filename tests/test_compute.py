"""Every ggml computation runs on one OS thread (runtime/compute.py): a second thread's OpenMP team slowed every
decode step by a third (measured; see the module). Checked here: decodes from the main thread, a plain thread
and the scheduler's engine thread all reach llama.cpp on one thread; a failure comes back to its caller; an
interrupted caller waits for the computation it handed over before the interrupt goes on."""

from __future__ import annotations

import _thread
import threading
import time

import llama_cpp
import pytest

from minicpmv_edge.runtime import load
from minicpmv_edge.runtime.compute import on_compute_thread
from minicpmv_edge.runtime.scheduler import GenerationRequest, Scheduler


def test_decodes_from_every_thread_run_on_one(converted, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: ANN001
    callers: set[int] = set()
    decode = llama_cpp.llama_decode

    def recording_decode(*args: object) -> int:
        callers.add(threading.get_ident())
        return decode(*args)

    monkeypatch.setattr(llama_cpp, "llama_decode", recording_decode)
    msgs = [{"role": "user", "content": ["Name three colours."]}]
    with load(converted("minicpm-v-4.5", "q8_0").llm_path.parent) as model:
        def greedy() -> str:
            return "".join(record.text for record in model.stream_generate(msgs, max_new_tokens=8))

        direct = greedy()
        from_thread: list[str] = []
        worker = threading.Thread(target=lambda: from_thread.append(greedy()))
        worker.start()
        worker.join()
        with Scheduler(model, n_parallel=2) as scheduler:
            scheduled = "".join(record.text for record in scheduler.submit(GenerationRequest(msgs, 8)))
    assert len(callers) == 1 and threading.get_ident() not in callers
    assert from_thread == [direct] and scheduled == direct


def test_a_failure_is_raised_in_the_caller() -> None:
    def fail() -> None:
        raise ValueError("bad shape")

    with pytest.raises(ValueError, match="bad shape"):
        on_compute_thread(fail)
    assert on_compute_thread(lambda a, b: a + b, 2, 3) == 5


def test_an_interrupted_caller_waits_for_its_computation() -> None:
    finished = threading.Event()

    def slow() -> str:
        time.sleep(0.5)
        finished.set()
        return "done"

    threading.Timer(0.1, _thread.interrupt_main).start()
    with pytest.raises(KeyboardInterrupt):
        on_compute_thread(slow)
    assert finished.is_set()
