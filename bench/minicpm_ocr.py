"""Benchmark: batch OCR with MiniCPM-OCR 1.0 (full published size, synthetic weights, Q4_K_M, its 4x mmproj and
published processor defaults) beside MiniCPM-V 4.6 (the same, 16x, its default) in one run, on dense generated
text pages (1344x1344 by default: 9 slices at 448; small glyphs on every line).

Each model runs `run_batch` (what `minicpmv ocr` does: one load, the JSONL + job store) over the same pages
with the same prompt and max new tokens, in its own child process so its peak RSS is its own. Reported:
pages/min, image encode s per page (clip.cpp, from the records' timings), prompt positions per page, peak RSS.
JSON and Markdown under bench/results/.

    python bench/minicpm_ocr.py --workdir /tmp/bench-ocr10          # full size: builds + converts once (~2x 2.6 GB)
    python bench/minicpm_ocr.py --tiny --pages 2                      # smoke run on the tiny checkpoints
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ocr import document_page  # noqa: E402 - bench/ocr.py's generated pages
from pairs import gguf_dir  # noqa: E402 - bench/pairs.py
from report import child_result, save  # noqa: E402 - bench/report.py
from runtime import engine_table  # noqa: E402 - bench/runtime.py

from minicpmv_edge.common.system import address_space_peak_rss_bytes  # noqa: E402

# (family, row label): MiniCPM-OCR first, the model this benchmark is about.
MODELS = {"minicpm-ocr-1.0": "MiniCPM-OCR 1.0 (4x)", "minicpm-v-4.6": "MiniCPM-V 4.6 (16x)"}


def prepare(family: str, size: str) -> Path:
    """`family`'s Q4_K_M conversion at `size` (the checkpoint's default mmproj)."""
    return gguf_dir(family, size)


def make_pages(folder: Path, count: int, size: tuple[int, int]) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        path = folder / f"dense{size[0]}x{size[1]}-{i:03d}.png"
        if not path.exists():
            document_page(i, size).save(path)
        paths.append(path)
    return paths


def child(model_dir: Path, pages: list[Path], output: Path, max_new_tokens: int, threads: int | None,
          parallel: int) -> dict:
    """One batch in this process: what `minicpmv ocr --parallel N` does, timed."""
    from minicpmv_edge.runtime.ocr import OcrOptions, run_batch

    for stale in (output, output.with_name(output.name + ".sqlite")):
        stale.unlink(missing_ok=True)
    started = time.perf_counter()
    summary = run_batch(model_dir, [str(p) for p in pages], output, OcrOptions(max_new_tokens=max_new_tokens),
                        n_threads=threads, parallel=parallel)
    seconds = time.perf_counter() - started   # the model load included, as a user of the command sees it
    records = [json.loads(line) for line in output.read_text().splitlines()]
    timings = [r["timings"] for r in records if r.get("timings")]
    return {"pages": len(pages), "pages_done": summary.done, "seconds": seconds,
            "pages_per_min": len(pages) / seconds * 60,
            "encode_s_per_page": sum(t["image_encode_ms"] for t in timings) / 1000 / max(len(timings), 1),
            "prompt_positions_per_page": sum(t["prompt_tokens"] for t in timings) / max(len(timings), 1),
            "decode_tokens_per_s": sum(t["decode_tokens_per_s"] for t in timings) / max(len(timings), 1),
            "peak_rss_bytes": address_space_peak_rss_bytes()}


def markdown(result: dict) -> str:
    return "\n".join([
        f"# Batch OCR, MiniCPM-OCR 1.0 beside MiniCPM-V 4.6: {result['size']} size, Q4_K_M, {result['pages']} dense "
        f"pages of {result['page_size']}, {result['max_new_tokens']} new tokens, {result['parallel']} page(s) at a time",
        "",
        *engine_table(result["engines"], [
            ("pages/min", "pages_per_min", ".2f"), ("encode s/page", "encode_s_per_page", ".2f"),
            ("prompt positions/page", "prompt_positions_per_page", ".0f"),
            ("decode tok/s", "decode_tokens_per_s", ".2f"), ("peak RSS GiB", "peak_rss_gib", ".2f")]), ""])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/minicpmv-bench-ocr10"))
    parser.add_argument("--tiny", action="store_true", help="tiny checkpoints (a smoke run; figures mean nothing)")
    parser.add_argument("--pages", type=int, default=10)
    parser.add_argument("--page-size", default="1344x1344", help="WxH of the generated pages")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=None)
    # 1: a 4x dense page (~2600 positions) needs more than the 2048 positions a parallel sequence holds today.
    parser.add_argument("--parallel", type=int, default=1, help="pages decoded together (minicpmv ocr --parallel)")
    parser.add_argument("--child", nargs=2, metavar=("MODEL_DIR", "OUTPUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    page_size = tuple(int(v) for v in args.page_size.split("x"))
    pages = make_pages(args.workdir / "pages", args.pages, page_size)
    if args.child:
        result = child(Path(args.child[0]), pages, Path(args.child[1]), args.max_new_tokens, args.threads,
                       args.parallel)
        print(json.dumps(result))
        return

    size = "tiny" if args.tiny else "full"
    engines = {}
    for family, label in MODELS.items():
        model_dir = prepare(family, size)
        command = [sys.executable, __file__, "--workdir", str(args.workdir), "--pages", str(args.pages),
                   "--page-size", args.page_size, "--max-new-tokens", str(args.max_new_tokens),
                   "--parallel", str(args.parallel),
                   "--child", str(model_dir), str(args.workdir / f"{family}-{size}.jsonl")]
        if args.threads:
            command += ["--threads", str(args.threads)]
        engines[label] = child_result(label, command)
        if engines[label]["pages_done"] != args.pages:
            raise SystemExit(f"{label}: {engines[label]['pages_done']} of {args.pages} pages done; see "
                             f"{args.workdir / f'{family}-{size}.jsonl'}")
    result = {"size": size, "pages": args.pages, "page_size": args.page_size, "parallel": args.parallel,
              "max_new_tokens": args.max_new_tokens, "engines": engines}
    save(f"minicpm-ocr-{size}", result, markdown)


if __name__ == "__main__":
    main()
