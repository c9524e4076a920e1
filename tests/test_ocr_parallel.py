"""`minicpmv ocr --parallel N`: pages as sequences of one context give the records `--parallel 1` gives,
and a kill mid-run still leaves every page exactly once after the resume."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
from test_ocr import N_IMAGES, N_PDF_PAGES, corpus, ocr, records  # noqa: F401 - corpus is a fixture

# What a record says about the page and its answer (timings and seconds differ between runs).
COMPARED = ("key", "source", "page", "content_hash", "model", "prompt", "text", "error")


def by_page(output: Path) -> dict[tuple[str, int], dict]:
    return {(r["source"], r["page"]): {k: r[k] for k in COMPARED} for r in records(output)}


@pytest.fixture(scope="module", params=["minicpm-v-4.5", "minicpm-v-4.6"])
def serial(request: pytest.FixtureRequest, converted, corpus: Path, tmp_path_factory):  # noqa: ANN001, ANN201, F811
    model_dir = converted(request.param, "q8_0").llm_path.parent
    output = tmp_path_factory.mktemp("serial") / "serial.jsonl"
    assert ocr(model_dir, corpus, output, "--parallel", "1").wait(timeout=600) == 1  # two pages fail
    return model_dir, by_page(output)


def test_parallel_records_equal_serial_ones(serial, corpus: Path, tmp_path: Path) -> None:  # noqa: ANN001, F811
    model_dir, expected = serial
    assert len(expected) == N_IMAGES + N_PDF_PAGES + 2
    output = tmp_path / "parallel.jsonl"
    assert ocr(model_dir, corpus, output, "--parallel", "3").wait(timeout=600) == 1
    assert by_page(output) == expected


def test_parallel_kill_and_resume_is_exactly_once(serial, corpus: Path, tmp_path: Path) -> None:  # noqa: ANN001, F811
    model_dir, expected = serial
    killed = tmp_path / "killed.jsonl"
    proc = ocr(model_dir, corpus, killed, "--parallel", "3")
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if killed.exists() and len(killed.read_text().splitlines()) > 4:
            break
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert ocr(model_dir, corpus, killed, "--parallel", "3").wait(timeout=600) == 1
    got = records(killed)
    assert len(got) == len({(r["source"], r["page"]) for r in got}) == len(expected)
    assert by_page(killed) == expected
