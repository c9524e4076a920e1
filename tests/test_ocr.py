"""Batch OCR on the tiny model: folders, globs, a generated multi-page PDF, a corrupt file; SIGKILL mid-run and
resume, then every page appears exactly once with the same text as an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from minicpmv_edge.runtime.ocr import OcrInputError, iter_pages, parse_page_ranges

N_IMAGES, N_PDF_PAGES = 8, 5


def page_image(seed: int) -> Image.Image:
    image = Image.new("RGB", (420, 300), (250, 250, 245))
    draw = ImageDraw.Draw(image)
    rng = np.random.default_rng(seed)
    for line in range(8):
        draw.text((20, 20 + 32 * line), " ".join(f"w{rng.integers(1000)}" for _ in range(6)), fill=(0, 0, 0))
    return image


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("scans")
    (root / "nested").mkdir()
    for i in range(N_IMAGES):
        page_image(i).save(root / ("nested" if i % 2 else ".") / f"scan{i:02d}.png")
    page_image(100).save(root / "skip-me.png")
    first, *rest = [page_image(200 + i) for i in range(N_PDF_PAGES)]
    first.save(root / "report.pdf", save_all=True, append_images=rest)
    (root / "broken.pdf").write_bytes(b"%PDF-1.4 not really")
    (root / "corrupt.png").write_bytes(b"\x89PNG broken")
    return root


@pytest.fixture(scope="module")
def model_dir(converted) -> Path:  # noqa: ANN001
    return converted("minicpm-v-4.5", "q8_0").llm_path.parent


def ocr(model_dir: Path, corpus: Path, output: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "minicpmv_edge.cli.main", "ocr", str(model_dir), str(corpus),
                             "-o", str(output), "--exclude", "skip-*", "-n", "24", "--quiet", *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def records(output: Path) -> list[dict]:
    return [json.loads(line) for line in output.read_text().splitlines()]


def test_pages_are_enumerated(corpus: Path) -> None:
    refs = list(iter_pages([str(corpus)], exclude=["skip-*"]))
    assert len(refs) == N_IMAGES + N_PDF_PAGES + 2  # + broken.pdf (page 0) + corrupt.png
    assert [r.page for r in refs if r.source.endswith("report.pdf")] == list(range(1, N_PDF_PAGES + 1))
    assert len(list(iter_pages([str(corpus / "*.pdf")], pages=parse_page_ranges("2-3")))) == 2 + 1
    with pytest.raises(OcrInputError):
        list(iter_pages([str(corpus / "nothing-*.png")]))
    with pytest.raises(OcrInputError):
        parse_page_ranges("2-x")


def test_kill_and_resume_is_exactly_once(model_dir: Path, corpus: Path, tmp_path: Path) -> None:
    reference = tmp_path / "reference.jsonl"
    proc = ocr(model_dir, corpus, reference, "--json")
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 1, err  # the broken PDF and the corrupt image fail, the batch goes on
    summary = json.loads(out)
    assert summary["done"] == N_IMAGES + N_PDF_PAGES and summary["failed"] == 2
    expected = {(r["source"], r["page"]): r for r in records(reference)}
    assert len(expected) == N_IMAGES + N_PDF_PAGES + 2
    assert all(r["error"] for r in expected.values() if r["text"] is None)

    killed = tmp_path / "killed.jsonl"
    for kills in range(3):  # kill at three different moments
        proc = ocr(model_dir, corpus, killed)
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None:
            if killed.exists() and len(killed.read_text().splitlines()) > 3 * kills + 1:
                break
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    proc = ocr(model_dir, corpus, killed)
    proc.communicate(timeout=600)
    got = records(killed)
    keys = [(r["source"], r["page"]) for r in got]
    assert len(keys) == len(set(keys)) == len(expected)
    for record in got:
        assert record["text"] == expected[(record["source"], record["page"])]["text"]

    rerun = ocr(model_dir, corpus, killed, "--json")
    out, _ = rerun.communicate(timeout=600)
    assert json.loads(out)["skipped"] == N_IMAGES + N_PDF_PAGES and len(records(killed)) == len(expected)


def test_retry_failed_reprocesses_and_keeps_one_record(model_dir: Path, corpus: Path, tmp_path: Path) -> None:
    output = tmp_path / "out.jsonl"
    assert ocr(model_dir, corpus / "corrupt.png", output).wait(timeout=300) == 1
    [first] = records(output)
    proc = ocr(model_dir, corpus / "corrupt.png", output, "--retry-failed", "--json")
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 1 and json.loads(out)["failed"] == 1
    [again] = records(output)  # reprocessed (still corrupt), and its old record replaced, not duplicated
    assert again["key"] == first["key"] and again["error"]
    assert ocr(model_dir, corpus / "corrupt.png", output).wait(timeout=300) == 1  # still failed: non-zero


def test_cli_bad_inputs_are_one_line(model_dir: Path, tmp_path: Path) -> None:
    for args, needle in [([str(tmp_path / "missing")], "no such file"), ([str(tmp_path / "*.png")], "matches no"),
                         ([str(tmp_path), "--pages", "x"], "page ranges")]:
        proc = ocr(model_dir, Path(args[0]), tmp_path / "o.jsonl", *args[1:])
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 1 and needle in err and err.strip().count("\n") == 0, err


def test_cli_usage_errors_exit_2_with_the_usage(tmp_path: Path) -> None:
    for args, needle in [([str(tmp_path), str(tmp_path), "--mode", "html"], "'--mode'"),
                         ([str(tmp_path)], "no inputs after MODEL"),
                         ([str(tmp_path), str(tmp_path), "-t", "0"], "'--threads'")]:
        proc = subprocess.run([sys.executable, "-m", "minicpmv_edge.cli.main", "ocr", *args, "-o",
                               str(tmp_path / "o.jsonl")], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2 and "Usage: minicpmv ocr" in proc.stderr and needle in proc.stderr, proc.stderr


def test_run_batch_is_the_command_as_a_function(model_dir: Path, corpus: Path, tmp_path: Path) -> None:
    from minicpmv_edge.runtime import load
    from minicpmv_edge.runtime.ocr import OcrOptions, run_batch

    inputs, output, options = [str(corpus / "scan00.png"), str(corpus / "corrupt.png")], tmp_path / "o.jsonl", \
        OcrOptions(max_new_tokens=8)
    totals, seen = [], []
    summary = run_batch(model_dir, inputs, output, options, n_threads=1, on_start=totals.append,
                        on_page=lambda result, so_far: seen.append((result.status, so_far.done, so_far.failed)))
    assert totals == [2] and seen == [("done", 1, 0), ("failed", 1, 1)]
    assert summary.as_dict() == {"done": 1, "skipped": 0, "failed": 1, "pages_per_min": summary.pages_per_min,
                                 "output": str(output)} and summary.pages_per_min > 0
    with load(model_dir) as model:  # a loaded model is the caller's: used, and left open
        again = run_batch(model, inputs, output, options)
        assert (again.done, again.skipped, again.failed) == (0, 1, 1)
        assert model.chat([{"role": "user", "content": "Hi"}], max_new_tokens=1, sampling=False).timings
    assert len(records(output)) == 2
    with pytest.raises(OcrInputError, match="no pages"):
        run_batch(model_dir, [str(corpus)], output, exclude=["*"])


def test_embedding_cache_skips_the_vision_tower_on_a_rerun(model_dir: Path, corpus: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    first, second = tmp_path / "text.jsonl", tmp_path / "markdown.jsonl"
    pages = [str(corpus / "scan00.png"), str(corpus / "report.pdf")]
    common = ["--embedding-cache", str(cache), "--pages", "1-2"]
    assert ocr(model_dir, Path(pages[0]), first, pages[1], *common).wait(timeout=300) == 0
    assert ocr(model_dir, Path(pages[0]), second, pages[1], "--mode", "markdown", *common).wait(timeout=300) == 0
    assert all(r["timings"]["image_encode_ms"] > 0 for r in records(first))
    assert all(r["timings"]["image_encode_ms"] == 0 for r in records(second))
    assert len(list(cache.glob("*.npy"))) >= 3  # one or more pieces per page


def test_embedding_cache_is_bounded(tmp_path: Path) -> None:
    from minicpmv_edge.runtime.embedding_cache import EmbeddingCache

    cache = EmbeddingCache(tmp_path, "model", max_bytes=3 * (64 * 16 * 4 + 128))
    for i in range(6):
        cache.put(("image", 9, i), np.full((64, 16), i, dtype=np.float32))
        time.sleep(0.01)
    assert cache.get(("image", 9, 0)) is None and cache.get(("image", 9, 5))[0, 0] == 5
    assert len(list(tmp_path.glob("*.npy"))) == 3


def test_minicpm_v_4_6_batch_equals_one_page_at_a_time(corpus: Path, converted, tmp_path: Path) -> None:
    """MiniCPM-V 4.6's decoder keeps a recurrent state that cannot be rewound, so each page after the first is
    decoded from the start; every page's text must equal a fresh model's answer for that page alone."""
    from minicpmv_edge.runtime import load
    from minicpmv_edge.runtime.ocr import PROMPTS

    model_dir = converted("minicpm-v-4.6", "q8_0").llm_path.parent
    output = tmp_path / "pages.jsonl"
    assert ocr(model_dir, corpus, output).wait(timeout=600) == 1  # the corrupt and broken inputs fail
    done = {(Path(r["source"]).name, r["page"]): r["text"] for r in records(output) if r["error"] is None}
    assert len(done) == N_IMAGES + N_PDF_PAGES
    for name in ("scan00.png", "scan03.png"):
        fresh = load(model_dir)
        path = next(corpus.rglob(name))
        answer = fresh.chat([{"role": "user", "content": [Image.open(path), PROMPTS["text"]]}], max_new_tokens=24,
                           sampling=False)
        fresh.close()
        assert [text for (source, _), text in done.items() if source == name] == [answer.text]
