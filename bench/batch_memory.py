"""Benchmark: flat memory in long batches (issue 9, point 4). Peak RSS of `minicpmv ocr` over 40 and over 400
distinct one-piece pages, with the in-memory embedding bound small (--embedding-memory-mb 64) and effectively
off (1024 MiB holds all 400 pages), on a model whose embeddings are 1 MiB per piece: MiniCPM-V 4.5's width
(64 query tokens x 4096 floats x 4 bytes) with everything else tiny, so 400 pages take minutes.

Each run is its own child process executing the `minicpmv ocr` entry point; its peak is its own VmHWM (read
in the child at exit, see common/system.py's address_space_peak_rss_bytes), and the parent samples the child's VmRSS as the
JSONL grows. The criterion: peak(400 pages) - peak(40 pages) <= the bound. JSON and Markdown under
bench/results/ (batch-memory.json / .md).

    python bench/batch_memory.py --workdir /tmp/benchmem

The checkpoint, its GGUF conversion and the pages are made once in the workdir and reused.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import runpy
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ocr import CLI, document_page  # noqa: E402 - bench/ocr.py: the generated document pages
from report import save  # noqa: E402 - bench/report.py

from minicpmv_edge.common.platform import proc_status_kib  # noqa: E402
from minicpmv_edge.common.system import address_space_peak_rss_bytes  # noqa: E402

FAMILY = "minicpm-v-4.5"
# The language model's width is 4.5's (hidden 4096; the family's query_num is 64): 1 MiB of float32 per
# piece. Everything else stays at the factory's tiny size or smaller.
OVERRIDES = {"hidden": 4096, "layers": 1, "intermediate": 512, "v_layers": 1}
PIECE_BYTES = 64 * 4096 * 4
PAGE_SIZE = (448, 448)
RUNS = [(40, 64), (400, 64), (40, 1024), (400, 1024)]   # (pages, --embedding-memory-mb)
PEAK_ENV = "MINICPMV_BENCH_PEAK_FILE"


def prepare(workdir: Path, preset: str, pages: int) -> tuple[Path, Path]:
    """The checkpoint, its conversion, and `pages` distinct document pages, made once."""
    from minicpmv_edge.convert import convert_checkpoint
    from minicpmv_edge.synthetic import make_checkpoint

    checkpoint, gguf_dir, page_dir = workdir / "checkpoint", workdir / f"gguf-{preset}", workdir / "pages"
    if not (checkpoint / "config.json").is_file():
        make_checkpoint(FAMILY, checkpoint, size="tiny", overrides=OVERRIDES)
    if not list(gguf_dir.glob("*.gguf")):
        convert_checkpoint(checkpoint, gguf_dir, preset)
    page_dir.mkdir(parents=True, exist_ok=True)
    for i in range(pages):  # document_page(seed) repeats only after 970 seeds: every page is a new image
        path = page_dir / f"page{i:04d}.png"
        if not path.exists():
            document_page(i, PAGE_SIZE).save(path)
    return gguf_dir, page_dir


def run_one(gguf_dir: Path, inputs: str, pages: int, memory_mb: int, workdir: Path, sample_s: float) -> dict:
    output = workdir / f"out-{pages}-{memory_mb}mb.jsonl"
    for stale in (output, output.with_name(output.name + ".sqlite")):
        stale.unlink(missing_ok=True)
    ocr_args = ["ocr", str(gguf_dir), inputs, "-o", str(output), "--max-slice-nums", "1", "--max-new-tokens", "1",
                "--embedding-memory-mb", str(memory_mb), "--json"]
    peak_file = workdir / f"peak-{pages}-{memory_mb}mb.json"
    peak_file.unlink(missing_ok=True)
    command = [sys.executable, __file__, "--child", *ocr_args]
    started = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, PEAK_ENV: str(peak_file)})
    samples = []   # (seconds, pages in the JSONL, VmRSS MiB)
    while proc.poll() is None:
        kib = proc_status_kib(proc.pid)
        if "VmRSS" in kib:
            done = output.read_bytes().count(b"\n") if output.exists() else 0
            samples.append((round(time.perf_counter() - started, 1), done, round(kib["VmRSS"] / 1024, 1)))
        time.sleep(sample_s)
    wall = time.perf_counter() - started
    stdout, stderr = proc.communicate()
    if proc.returncode:
        sys.exit(f"failed ({proc.returncode}): {' '.join(command)}\n{stderr[-2000:]}")
    summary = json.loads(stdout.strip().splitlines()[-1])
    records = [json.loads(line) for line in output.read_text().splitlines()]
    encode_ms = sorted(r["timings"]["image_encode_ms"] for r in records if r.get("timings"))
    peak = json.loads(peak_file.read_text())["peak_rss_bytes"]
    # The child's RSS over its first 40 pages (in a 40-page run: its peak, before teardown's drop).
    first_40 = max((rss for _, done, rss in samples if done < 40), default=None)
    step = max(1, len(samples) // 40)
    return {"pages": pages, "embedding_memory_mb": memory_mb, "pages_done": summary["done"],
            "failed": summary["failed"], "peak_rss_bytes": peak, "peak_rss_mib": round(peak / 2**20, 1),
            "wall_s": round(wall, 1), "pages_per_min": summary["pages_per_min"],
            "median_image_encode_ms": round(encode_ms[len(encode_ms) // 2], 1) if encode_ms else None,
            "pieces_encoded_mib": round(len(encode_ms) * PIECE_BYTES / 2**20),
            "max_rss_mib_first_40_pages": first_40,
            "command": ["minicpmv", *ocr_args], "launched_as": command,
            "rss_samples": {"columns": ["seconds", "pages_in_jsonl", "vmrss_mib"], "rows": samples[::step]}}


def markdown(result: dict) -> str:
    lines = [f"# Batch memory: `minicpmv ocr` peak RSS, {result['model']['label']}", "",
             f"Distinct {result['page_size']} document pages, one piece each (--max-slice-nums 1), 1 new token; "
             f"embeddings {result['model']['piece_mib']:g} MiB per piece. Peak = the child's VmHWM.", "",
             "| pages | --embedding-memory-mb | peak RSS MiB | RSS over the first 40 pages MiB | wall s | pages/min |",
             "|---:|---:|---:|---:|---:|---:|"]
    for run in result["runs"]:
        lines.append(f"| {run['pages']} | {run['embedding_memory_mb']} | {run['peak_rss_mib']:.1f} | "
                     f"{run['max_rss_mib_first_40_pages'] or '-'} | {run['wall_s']:.0f} | {run['pages_per_min']:.1f} |")
    lines += ["", "| --embedding-memory-mb | peak 400 - peak 40 MiB | embeddings kept 400 - 40 MiB | within the bound |",
              "|---:|---:|---:|---|"]
    for bound, row in result["differences"].items():
        lines.append(f"| {bound} | {row['diff_mib']:.1f} | {row['embeddings_kept_diff_mib']:g} | "
                     f"{'yes' if row['within_bound'] else 'NO'} |")
    lines += ["", f"command: `{' '.join(result['runs'][1]['command'])}`", ""]
    return "\n".join(lines)


def child(ocr_args: list[str]) -> None:
    """Run the `minicpmv` entry point in this process and, at exit, write this process's VmHWM."""
    peak_file = os.environ[PEAK_ENV]
    atexit.register(lambda: Path(peak_file).write_text(json.dumps({"peak_rss_bytes": address_space_peak_rss_bytes()})))
    sys.argv = ["minicpmv", *ocr_args]
    runpy.run_module(CLI[-1], run_name="__main__", alter_sys=True)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2:])
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/minicpmv-bench-memory"))
    parser.add_argument("--preset", default="q8_0", choices=["q8_0", "f16"])
    parser.add_argument("--sample-s", type=float, default=1.0, help="how often the child's VmRSS is sampled")
    args = parser.parse_args()
    workdir = args.workdir.resolve()
    most = max(pages for pages, _ in RUNS)
    gguf_dir, page_dir = prepare(workdir, args.preset, most)
    runs = []
    for pages, memory_mb in RUNS:
        # 40 pages: page0000..page0039 (a glob the CLI expands); 400: the folder.
        inputs = str(page_dir / "page00[0-3]?.png") if pages == 40 else str(page_dir)
        assert pages in (40, most)
        run = run_one(gguf_dir, inputs, pages, memory_mb, workdir, args.sample_s)
        print(f"{pages} pages, --embedding-memory-mb {memory_mb}: peak {run['peak_rss_mib']:.1f} MiB, "
              f"{run['wall_s']:.0f} s", flush=True)
        runs.append(run)
    differences = {}
    for bound in sorted({m for _, m in RUNS}):
        few, many = (next(r for r in runs if (r["pages"], r["embedding_memory_mb"]) == (n, bound)) for n in (40, most))
        diff = (many["peak_rss_bytes"] - few["peak_rss_bytes"]) / 2**20
        kept = (min(most, bound) - min(40, bound)) * PIECE_BYTES / 2**20   # what the LRU may hold more
        differences[bound] = {"diff_mib": round(diff, 1), "embeddings_kept_diff_mib": kept,
                              "within_bound": diff <= bound}
    gguf = {p.name: p.stat().st_size for p in sorted(gguf_dir.glob("*.gguf"))}
    result = {"model": {"label": f"synthetic {FAMILY} layout, hidden 4096 / query_num 64, rest tiny, {args.preset}",
                        "family": FAMILY, "factory_overrides": OVERRIDES, "preset": args.preset,
                        "piece_mib": PIECE_BYTES / 2**20, "gguf_bytes": gguf},
              "page_size": "x".join(map(str, PAGE_SIZE)), "runs": runs, "differences": differences,
              "criterion": "peak RSS(400 pages) - peak RSS(40 pages) <= --embedding-memory-mb",
}
    save("batch-memory", result, markdown)


if __name__ == "__main__":
    main()
