"""Benchmark: batch OCR pages/min with `minicpmv ocr` (one model load, one process) against a shell loop
running the one-shot `minicpmv ask` per page, on the same generated document pages and PDF, with the
same max new tokens. JSON and Markdown under bench/results/. With --transformers-46, a third column:
transformers running MiniCPM-V 4.6 natively on the CPU (full-size synthetic checkpoint from
bench/minicpmv4_6.py's workdir, one model load, same pages, prompt and max new tokens).

    python bench/ocr.py --model-dir /tmp/minicpmv-bench/out-minicpm-v-4.5-full-q4_k_m --images 20 --pdf-pages 10 \
        --transformers-46 /tmp/minicpmv-bench46
    python bench/ocr.py --tiny
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parent))
from minicpmv4_6 import TransformersModel, prompt_ids  # noqa: E402 - bench/minicpmv4_6.py

from minicpmv_edge.runtime.ocr import PROMPTS  # noqa: E402
from report import save  # bench/report.py

CLI = [sys.executable, "-m", "minicpmv_edge.cli.main"]


def document_page(seed: int, size: tuple[int, int]) -> Image.Image:
    page = Image.new("RGB", size, (252, 252, 248))
    draw = ImageDraw.Draw(page)
    words = ["invoice", "total", "amount", "date", "customer", "order", "tax", "item", "price", "qty"]
    for row in range(size[1] // 28 - 2):
        line = " ".join(words[(seed * 7 + row * 3 + i) % len(words)] + str((seed + row * i) % 97) for i in range(8))
        draw.text((24, 24 + 28 * row), line, fill=(10, 10, 10))
    return page


def make_corpus(folder: Path, images: int, pdf_pages: int, size: tuple[int, int]) -> tuple[list[Path], Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(images):
        path = folder / f"page{i:03d}.png"
        document_page(i, size).save(path)
        paths.append(path)
    pdf = folder / "document.pdf"
    first, *rest = [document_page(1000 + i, size) for i in range(pdf_pages)]
    first.save(pdf, save_all=True, append_images=rest, resolution=150)
    return paths, pdf


def transformers_46_seconds(workdir: Path, pages: list[Path], max_new_tokens: int) -> float:
    """One load of transformers' MiniCPM-V 4.6, then every page in turn (prompt ids computed beforehand)."""
    images = [Image.open(page).convert("RGB") for page in pages]
    all_ids = prompt_ids(workdir / "q4_k_m", "16x", images, PROMPTS["text"])
    started = time.perf_counter()
    model = TransformersModel(workdir / "checkpoint", "16x")
    for ids, image in zip(all_ids, images):
        model.generate(ids, image, max_new_tokens)
    return time.perf_counter() - started


def timed(command: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run(command, check=False, capture_output=True)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", type=Path)
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--images", type=int, default=20)
    parser.add_argument("--pdf-pages", type=int, default=10)
    parser.add_argument("--page-size", default="448x448", help="WxH of the generated pages")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/minicpmv-bench-ocr"))
    parser.add_argument("--label", default=None)
    parser.add_argument("--transformers-46", type=Path, help="bench/minicpmv4_6.py's workdir (checkpoint + GGUF)")
    args = parser.parse_args()
    if args.tiny:
        from minicpmv_edge.cli.demo import prepared_model

        args.model_dir, args.label = prepared_model(), args.label or "tiny"
    size = tuple(int(v) for v in args.page_size.split("x"))
    images, pdf = make_corpus(args.workdir / "pages", args.images, args.pdf_pages, size)
    n_pages = args.images + args.pdf_pages
    tokens = ["-n", str(args.max_new_tokens)]

    output = args.workdir / "ours.jsonl"
    for stale in (output, output.with_name(output.name + ".sqlite")):
        stale.unlink(missing_ok=True)
    ours_s = timed(CLI + ["ocr", str(args.model_dir), *map(str, images), str(pdf), "-o", str(output), "-q", *tokens])
    done = sum(1 for line in output.read_text().splitlines() if json.loads(line)["text"] is not None)

    # The shell loop sees the PDF's pages as the PNGs the batch rendered (same pixels, 150 dpi).
    import pypdfium2

    loop_pages = list(images)
    for number, page in enumerate(pypdfium2.PdfDocument(str(pdf)), start=1):
        path = args.workdir / "pages" / f"document-p{number}.png"
        page.render(scale=150 / 72).to_pil().save(path)
        loop_pages.append(path)
    loop_s = sum(timed(CLI + ["ask", str(args.model_dir), "--image", str(p), *tokens, PROMPTS["text"]])
                 for p in loop_pages)
    flows = {"minicpmv ocr (one load)": ours_s, "shell loop of minicpmv ask": loop_s}
    if args.transformers_46:
        flows["transformers, MiniCPM-V 4.6 float32 (one load)"] = transformers_46_seconds(
            args.transformers_46, loop_pages, args.max_new_tokens)

    label = args.label or args.model_dir.name
    result = {"label": label, "pages": n_pages, "pages_done": done, "page_size": args.page_size,
              "max_new_tokens": args.max_new_tokens,
              "flows": {name: {"seconds": round(seconds, 1), "pages_per_min": round(n_pages / seconds * 60, 2),
                               "ours_speedup": round(seconds / ours_s, 2)} for name, seconds in flows.items()}}
    save(f"ocr-{label}", result, lambda result: "\n".join([
        f"# Batch OCR: {label}, {n_pages} pages of {args.page_size} ({args.images} images + a {args.pdf_pages}-page PDF), "
        f"{args.max_new_tokens} new tokens", "", "| flow | seconds | pages/min | minicpmv ocr is faster by |",
        "|---|---:|---:|---:|",
        *(f"| {name} | {row['seconds']:.1f} | {row['pages_per_min']:.2f} | {row['ours_speedup']:.2f}x |"
          for name, row in result["flows"].items()), ""]))


if __name__ == "__main__":
    main()
