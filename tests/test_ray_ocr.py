"""`minicpmv ocr --ray` on a local Ray instance (2 CPUs, 2 workers, the tiny model): the records equal a local
run's; a worker killed mid-page, a worker that comes back without its model, and a driver SIGKILLed and
restarted each lose and duplicate nothing. Ray starts once for the module."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_ocr import page_image

from minicpmv_edge.runtime.ocr import OcrOptions, run_batch

OPTIONS = OcrOptions(max_new_tokens=24)
TIMING = ("seconds", "timings")
N_GOOD = 9  # 6 images + a 3-page PDF; and a broken PDF and a corrupt image, which fail


def by_key(output: Path) -> dict[str, dict]:
    """The JSONL's records by job key without timing fields; fails on a key written twice."""
    lines = [json.loads(line) for line in output.read_text().splitlines()]
    records = {r["key"]: {k: v for k, v in r.items() if k not in TIMING} for r in lines}
    assert len(records) == len(lines), "a page was written twice"
    return records


@pytest.fixture(scope="module")
def ray_address() -> str:
    try:
        import ray
    except ImportError:
        pytest.skip("Ray is not installed (pip install -e '.[ray]')")
    try:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="WARNING")
    except Exception as e:  # noqa: BLE001 - whatever keeps Ray from starting here is a reason to skip
        pytest.skip(f"Ray cannot start here: {e}")
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("ray-scans")
    for i in range(6):
        page_image(i).save(root / f"scan{i:02d}.png")
    first, *rest = [page_image(200 + i) for i in range(3)]
    first.save(root / "report.pdf", save_all=True, append_images=rest)
    (root / "broken.pdf").write_bytes(b"%PDF-1.4 not really")
    (root / "corrupt.png").write_bytes(b"\x89PNG broken")
    return root


@pytest.fixture(scope="module")
def model_dir(converted, tmp_path_factory: pytest.TempPathFactory) -> Path:  # noqa: ANN001
    """A copy of the tiny pair: one test takes it away from under a running worker."""
    return Path(shutil.copytree(converted("minicpm-v-4.5", "q8_0").llm_path.parent,
                                tmp_path_factory.mktemp("ray-model") / "pair"))


@pytest.fixture(scope="module")
def expected(model_dir: Path, corpus: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    output = tmp_path_factory.mktemp("local") / "pages.jsonl"
    summary = run_batch(model_dir, [str(corpus)], output, OPTIONS, n_threads=1)
    assert (summary.done, summary.failed) == (N_GOOD, 2)
    return by_key(output)


def test_without_ray_says_how_to_install_it(tmp_path: Path) -> None:
    code = ("import sys; sys.modules['ray'] = None\n"  # what `import ray` meets where Ray is not installed
            "from minicpmv_edge.cli.main import main\n"
            f"sys.argv = ['minicpmv', 'ocr', {str(tmp_path)!r}, {str(tmp_path)!r}, '-o', 'x.jsonl', '--ray', 'auto']\n"
            "main()\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == ["error: --ray needs Ray: pip install 'minicpmv-edge[ray]'"]


def test_records_equal_a_local_run_and_a_killed_worker_loses_nothing(ray_address: str, model_dir: Path,
                                                                     corpus: Path, expected: dict,
                                                                     tmp_path: Path) -> None:
    from minicpmv_edge.runtime.ray_ocr import RayPool

    output, killed = tmp_path / "pages.jsonl", []

    def kill_one_worker(result, so_far) -> None:  # noqa: ANN001 - with its next page running, one queued
        if so_far.done == 2 and not killed:
            os.kill(pool.states[0].pid, signal.SIGKILL)
            killed.append(result.ref)

    with RayPool(model_dir, workers=2, threads=1) as pool:
        summary = run_batch(pool, [str(corpus)], output, OPTIONS, on_page=kill_one_worker)
    assert killed and (summary.done, summary.failed) == (N_GOOD, 2)
    assert by_key(output) == expected


def test_workers_lost_for_good_fail_only_their_pages_and_retry_failed_redoes_them(
        ray_address: str, model_dir: Path, corpus: Path, expected: dict, tmp_path: Path) -> None:
    """Mid-run, one worker comes back from a kill on a node without the model and the other is gone for good:
    the pages they held, and then all the others, are recorded failed with the reason, each once."""
    import ray

    from minicpmv_edge.runtime.ray_ocr import RayPool

    output, hidden, messages = tmp_path / "pages.jsonl", model_dir.with_name("hidden"), []

    def lose_both_workers(result, so_far) -> None:  # noqa: ANN001
        if so_far.done == 2 and model_dir.exists():
            model_dir.rename(hidden)
            os.kill(pool.states[0].pid, signal.SIGKILL)
            ray.kill(pool.actors[1], no_restart=True)

    try:
        with RayPool(model_dir, workers=2, threads=1, on_message=messages.append) as pool:
            summary = run_batch(pool, [str(corpus)], output, OPTIONS, on_page=lose_both_workers)
    finally:
        if hidden.exists():
            hidden.rename(model_dir)
    lost = [r["error"] for r in by_key(output).values() if r["error"] and r["key"] in expected
            and not expected[r["key"]]["error"]]
    assert lost and summary.done + len(lost) == N_GOOD and summary.failed == 2 + len(lost)
    reasons = ("cannot load the model", "its Ray worker died running it", "no Ray worker holding the job's model")
    assert all(any(reason in error for reason in reasons) for error in lost), lost
    assert len(messages) == 2 and "cannot load the model" in messages[0] + messages[1], messages
    assert "a Ray worker is gone" in messages[0] + messages[1], messages
    with RayPool(model_dir, workers=2, threads=1) as pool:
        again = run_batch(pool, [str(corpus)], output, OPTIONS, retry_failed=True)
    assert again.done == len(lost) and by_key(output) == expected


def test_driver_killed_and_restarted_resumes(ray_address: str, model_dir: Path, corpus: Path, expected: dict,
                                             tmp_path: Path) -> None:
    output = tmp_path / "pages.jsonl"

    def driver() -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "minicpmv_edge.cli.main", "ocr", str(model_dir), str(corpus),
                                 "-o", str(output), "-n", "24", "--ray", ray_address, "--workers", "2", "-t", "1",
                                 "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    proc, deadline = driver(), time.time() + 300
    while time.time() < deadline and proc.poll() is None and not (output.exists() and
                                                                  len(output.read_text().splitlines()) >= 4):
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    written = len(output.read_text().splitlines())
    assert 4 <= written < N_GOOD + 2, "the driver was not killed mid-run"
    out, err = driver().communicate(timeout=300)
    summary = json.loads(out)
    assert summary["skipped"] + summary["done"] == N_GOOD and summary["skipped"] > 0, err
    assert by_key(output) == expected
