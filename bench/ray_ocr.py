"""Benchmark: batch OCR pages/min on a local Ray instance with 1 and 2 workers (one thread each) beside the
local `run_batch` (one thread) in the same run, on the same generated pages and PDF, MiniCPM-V 4.6 Q4_K_M.
The rate is the job's own (`Summary.pages_per_min`: from the first page to the last, model loads and Ray's
start excluded; those are given apart), so `local / ray, 1 worker` is the overhead of the Ray path (the driver
renders, PNG-encodes and ships every page, the record travels back) and `2 workers / 1 worker` its scaling.

    python bench/ray_ocr.py --size tiny --rounds 3                         # smoke run
    python bench/ray_ocr.py --size full                                    # the full-size pair of bench/pairs.py
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pairs import gguf_dir  # noqa: E402 - bench/pairs.py
from ocr import make_corpus  # noqa: E402 - bench/ocr.py

from minicpmv_edge.runtime.pair import resolve_pair  # noqa: E402
from minicpmv_edge.runtime.ocr import OcrOptions, run_batch  # noqa: E402
from report import save  # noqa: E402 - bench/report.py

FAMILY = "minicpm-v-4.6"


def timed_job(model: object, inputs: list[str], output: Path, options: OcrOptions) -> dict:
    for stale in (output, output.with_name(output.name + ".sqlite")):
        stale.unlink(missing_ok=True)
    started = time.perf_counter()
    # parallel=1: one page at a time on the single-sequence engine, as each Ray worker runs them (the default
    # --parallel batches several pages' decoding, which would compare a different job).
    summary = run_batch(model, inputs, output, options, n_threads=1, parallel=1)
    assert summary.failed == 0, f"{summary.failed} pages failed"
    return {"pages_per_min": summary.pages_per_min, "wall_seconds": round(time.perf_counter() - started, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=("tiny", "full"), required=True)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/minicpmv-bench-ray"))
    parser.add_argument("--images", type=int, default=12)
    parser.add_argument("--pdf-pages", type=int, default=4)
    parser.add_argument("--page-size", default="448x448", help="WxH of the generated pages")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=1, help="Runs of every flow, taken in turn; the best counts "
                        "(the machine is shared: the best run is the least disturbed)")
    args = parser.parse_args()
    import ray

    from minicpmv_edge.runtime.ray_ocr import RayPool

    model = list(resolve_pair(gguf_dir(FAMILY, args.size)))
    images, pdf = make_corpus(args.workdir / "pages", args.images, args.pdf_pages,
                              tuple(int(v) for v in args.page_size.split("x")))
    inputs, options = [*map(str, images), str(pdf)], OcrOptions(max_new_tokens=args.max_new_tokens)

    started = time.perf_counter()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="WARNING")
    ray_start = round(time.perf_counter() - started, 1)
    runs: dict[str, list[dict]] = {}
    for _ in range(args.rounds):
        runs.setdefault("local run_batch, 1 thread", []).append(
            timed_job(model, inputs, args.workdir / "local.jsonl", options))
        for workers in (1, 2):
            with RayPool(model, workers=workers, threads=1) as pool:
                runs.setdefault(f"Ray, {workers} worker{'s' if workers > 1 else ''} x 1 thread", []).append(
                    timed_job(pool, inputs, args.workdir / f"ray-{workers}.jsonl", options))
    ray.shutdown()
    flows = {name: {**max(rows, key=lambda row: row["pages_per_min"]),
                    "all_pages_per_min": [row["pages_per_min"] for row in rows]} for name, rows in runs.items()}
    local = flows["local run_batch, 1 thread"]["pages_per_min"]
    for row in flows.values():
        row["vs_local"] = round(row["pages_per_min"] / local, 3)

    label = f"{args.size}-4.6-q4_k_m"
    n_pages = args.images + args.pdf_pages
    result = {"label": label, "pages": n_pages, "page_size": args.page_size, "max_new_tokens": args.max_new_tokens,
              "rounds": args.rounds, "ray_version": ray.__version__, "ray_start_seconds": ray_start, "flows": flows}
    save(f"ray-ocr-{label}", result, lambda result: "\n".join([
        f"# Batch OCR on Ray: {label}, {n_pages} pages of {args.page_size} ({args.images} images + a "
        f"{args.pdf_pages}-page PDF), {args.max_new_tokens} new tokens, Ray {ray.__version__} on this machine",
        "", f"| flow | pages/min (best of {args.rounds}) | vs local | wall s (with model loads) |",
        "|---|---:|---:|---:|",
        *(f"| {name} | {row['pages_per_min']:.2f} | {row['vs_local']:.3f} | {row['wall_seconds']:.1f} |"
          for name, row in result["flows"].items()),
        "", f"Ray's own start (ray.init, not in the wall times): {ray_start:.1f} s", ""]))


if __name__ == "__main__":
    main()
