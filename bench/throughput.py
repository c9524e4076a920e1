"""Benchmark (issue 13 point 5): pages/min and peak RSS of batch OCR on dense generated text pages with a fixed
number of new tokens (end-of-sequence ignored, so every engine does the same work), in one run:

- `minicpmv ocr --parallel N` (N = 1..4; 1 is the single-sequence engine, 2+ the scheduler's sequences);
- `minicpmv serve --parallel N` under N concurrent clients (skipped when minicpmv_edge.server is absent);
- `llama-server -np N` built from the pinned sdist, driven by the same client (OpenAI API, base64 images,
  `ignore_eos`);
- a shell loop of `llama-mtmd-cli`, one process per page.

`minicpmv ocr` and the shell loop are timed as a user runs them (model load included); the servers are
timed after they are healthy and have answered one warm-up page that is not among the measured ones.

    python bench/throughput.py --family minicpm-v-4.6 --size full --preset q4_k_m --pages 6 --new-tokens 256
    python bench/throughput.py --size tiny --pages 3 --new-tokens 16 --parallel 1,2      # smoke run
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import queue
import socket
import subprocess
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pairs import gguf_dir  # noqa: E402 - bench/pairs.py
from report import save  # noqa: E402 - bench/report.py

from minicpmv_edge.runtime.ocr import PROMPTS  # noqa: E402

CLI = [sys.executable, "-m", "minicpmv_edge.cli.main"]
LLAMA_BIN = Path.home() / ".cache" / "minicpmv-edge" / "llama-build" / "bin"
# As our Engine (use_extra_bufts=False): the pinned build's repacked AMX matmul crashes on AMX CPUs, and
# repacking bought no speed on AVX2 (measured).
NO_REPACK = ["--no-repack"]
PAGE_SIZE = (1344, 1344)  # overview + 9 slices with the default max_slice_nums: ~710 prompt positions on 4.6


def dense_page(seed: int) -> Image.Image:
    """A page of small print filling the whole 1344x1344 canvas."""
    page = Image.new("RGB", PAGE_SIZE, (252, 252, 248))
    draw = ImageDraw.Draw(page)
    words = ["invoice", "total", "amount", "date", "customer", "order", "tax", "item", "price", "qty", "net", "due"]
    for row in range(PAGE_SIZE[1] // 16 - 2):
        line = " ".join(words[(seed * 7 + row * 3 + i) % len(words)] + str((seed * 31 + row * i) % 997)
                        for i in range(22))
        draw.text((12, 12 + 16 * row), line, fill=(10, 10, 10))
    return page


def prepare_model(family: str, size: str, preset: str) -> tuple[Path, Path]:
    from minicpmv_edge.runtime.pair import resolve_pair

    return resolve_pair(gguf_dir(family, size, preset))


def peak_rss_of(process: subprocess.Popen, peak: list[float], stop: threading.Event) -> None:
    """Follow the process's VmHWM (its peak resident set, kept by the kernel) until `stop`."""
    status = Path(f"/proc/{process.pid}/status")
    while not stop.is_set():
        try:
            for line in status.read_text().splitlines():
                if line.startswith("VmHWM:"):
                    peak[0] = max(peak[0], int(line.split()[1]) / 1024)
        except OSError:
            return
        stop.wait(0.1)


class Watched:
    """A child process with its peak RSS followed."""

    def __init__(self, command: list[str], **kwargs: object):
        # stderr into a file: a pipe nobody reads would block a chatty server once its buffer is full
        self._log = tempfile.TemporaryFile()
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=self._log, **kwargs)
        self.peak, self._stop = [0.0], threading.Event()
        self._thread = threading.Thread(target=peak_rss_of, args=(self.process, self.peak, self._stop), daemon=True)
        self._thread.start()

    def log_tail(self) -> str:
        self._log.seek(0)
        return self._log.read().decode(errors="replace")[-2000:]

    def wait(self) -> int:
        code = self.process.wait()
        self._stop.set()
        return code

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(port: int, server: Watched, timeout_s: float = 900) -> None:
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"the server exited: {server.log_tail()}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise RuntimeError("the server did not become healthy")


def chat_request(port: int, page: Path, new_tokens: int) -> float:
    """The request's seconds, from sending it to its whole answer."""
    started = time.perf_counter()
    image = base64.b64encode(page.read_bytes()).decode()
    body = {"model": "bench", "max_tokens": new_tokens, "temperature": 0, "ignore_eos": True,
            "messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{image}"}},
                {"type": "text", "text": PROMPTS["text"]}]}]}
    request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=3600) as response:
        usage = json.load(response).get("usage", {})
    if usage.get("completion_tokens") not in (None, new_tokens):
        raise RuntimeError(f"the server generated {usage['completion_tokens']} tokens, not {new_tokens}")
    return time.perf_counter() - started


def drive(port: int, pages: list[Path], clients: int, new_tokens: int) -> tuple[float, list[float]]:
    """`clients` threads taking pages from one queue: the seconds until every page is answered, and each
    request's seconds."""
    todo: queue.Queue[Path] = queue.Queue()
    for page in pages:
        todo.put(page)
    errors: list[BaseException] = []
    latencies: list[float] = []

    def client() -> None:
        while True:
            try:
                page = todo.get_nowait()
            except queue.Empty:
                return
            try:
                latencies.append(chat_request(port, page, new_tokens))
            except BaseException as e:  # noqa: BLE001 - reported after the run
                errors.append(e)

    started = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise RuntimeError(f"{len(errors)} requests failed, first: {errors[0]}")
    return time.perf_counter() - started, latencies


def ours_ocr(model: Path, mmproj: Path, pages: list[Path], n: int, new_tokens: int, threads: int, workdir: Path) -> dict:
    output = workdir / f"ocr-{n}.jsonl"
    for stale in (output, output.with_name(output.name + ".sqlite")):
        stale.unlink(missing_ok=True)
    started = time.perf_counter()
    run = Watched(CLI + ["ocr", str(model), str(mmproj), *map(str, pages), "-o", str(output), "-q", "-t", str(threads),
                         "-n", str(new_tokens), "--ignore-eos", "--parallel", str(n)])
    if run.wait() != 0:
        raise RuntimeError(f"minicpmv ocr failed: {run.log_tail()}")
    seconds = time.perf_counter() - started
    # each page's own seconds (its record's), the model load excluded: one at a time, `minicpmv ask`'s latency
    page_seconds = [json.loads(line)["seconds"] for line in output.read_text().splitlines() if line.strip()]
    return {"seconds": seconds, "peak_rss_mb": run.peak[0], "median_page_s": statistics.median(page_seconds)}


def served(command: list[str], port: int, pages: list[Path], warmup: Path, clients: int, new_tokens: int) -> dict:
    """Start a server, warm it with one request on a page not measured (load and first-graph costs are not
    throughput; the page's embeddings must not be cached for the measured ones), then time."""
    server = Watched(command)
    try:
        wait_healthy(port, server)
        chat_request(port, warmup, new_tokens)
        seconds, latencies = drive(port, pages, clients, new_tokens)
        return {"seconds": seconds, "peak_rss_mb": server.peak[0], "median_page_s": statistics.median(latencies)}
    finally:
        server.stop()


def mtmd_loop(model: Path, mmproj: Path, pages: list[Path], new_tokens: int, threads: int) -> dict:
    started, peak, page_seconds = time.perf_counter(), 0.0, []
    for page in pages:
        page_started = time.perf_counter()
        run = Watched([str(LLAMA_BIN / "llama-mtmd-cli"), "-m", str(model), "--mmproj", str(mmproj), "--image",
                       str(page), "-p", PROMPTS["text"], "-n", str(new_tokens), "--ignore-eos", "--temp", "0",
                       "-t", str(threads), "-c", "4096", *NO_REPACK])
        if run.wait() != 0:
            raise RuntimeError(f"llama-mtmd-cli failed: {run.log_tail()}")
        peak = max(peak, run.peak[0])
        page_seconds.append(time.perf_counter() - page_started)
    return {"seconds": time.perf_counter() - started, "peak_rss_mb": peak,
            "median_page_s": statistics.median(page_seconds)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", default="minicpm-v-4.6")
    parser.add_argument("--size", default="full", choices=["tiny", "full"])
    parser.add_argument("--preset", default="q4_k_m")
    parser.add_argument("--pages", type=int, default=6)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--parallel", default="1,2,3,4", help="Comma-separated N for every flow")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--context", type=int, default=4096, help="Positions per sequence/slot of the servers")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/minicpmv-bench-throughput"))
    parser.add_argument("--skip", default="", help="Comma-separated flows to skip: ocr,serve,llama-server,mtmd-cli")
    args = parser.parse_args()
    parallel = [int(n) for n in args.parallel.split(",")]
    skip = set(filter(None, args.skip.split(",")))
    args.workdir.mkdir(parents=True, exist_ok=True)
    model, mmproj = prepare_model(args.family, args.size, args.preset)
    pages = []
    for i in range(args.pages):
        path = args.workdir / "pages" / f"dense{i:03d}.png"
        path.parent.mkdir(exist_ok=True)
        if not path.exists():
            dense_page(i).save(path)
        pages.append(path)
    warmup = args.workdir / "pages" / "warmup.png"
    dense_page(10_000).save(warmup)

    flows: dict[str, dict] = {}
    for n in parallel:
        if "ocr" not in skip:
            flows[f"minicpmv ocr --parallel {n}"] = ours_ocr(model, mmproj, pages, n, args.new_tokens, args.threads,
                                                             args.workdir)
        if "serve" not in skip:
            try:
                import minicpmv_edge.server  # noqa: F401 - the server exists in this tree
            except ImportError:
                skip.add("serve")
            else:
                port = free_port()
                flows[f"minicpmv serve --parallel {n}, {n} clients"] = served(
                    CLI + ["serve", str(model), str(mmproj), "--port", str(port), "-t", str(args.threads),
                           "--parallel", str(n), "--context", str(args.context)], port, pages, warmup, n, args.new_tokens)
        if "llama-server" not in skip:
            port = free_port()
            flows[f"llama-server -np {n}, {n} clients"] = served(
                [str(LLAMA_BIN / "llama-server"), "-m", str(model), "--mmproj", str(mmproj), "--port", str(port),
                 "-np", str(n), "-c", str(args.context * n), "-t", str(args.threads), "--no-warmup", *NO_REPACK],
                port, pages, warmup, n, args.new_tokens)
    if "mtmd-cli" not in skip:
        flows["shell loop of llama-mtmd-cli"] = mtmd_loop(model, mmproj, pages, args.new_tokens, args.threads)

    for row in flows.values():
        row["pages_per_min"] = round(len(pages) / row["seconds"] * 60, 3)
        row["seconds"], row["peak_rss_mb"] = round(row["seconds"], 1), round(row["peak_rss_mb"], 1)
        row["median_page_s"] = round(row["median_page_s"], 2)
    best_llama = max((row["pages_per_min"] for name, row in flows.items() if name.startswith("llama-server")),
                     default=None)
    for row in flows.values():
        row["vs_best_llama_server"] = round(row["pages_per_min"] / best_llama, 3) if best_llama else None
    best_ocr = max((row["pages_per_min"] for name, row in flows.items() if name.startswith("minicpmv ocr")),
                   default=None)
    alone = {kind: flows.get(name, {}).get("median_page_s") for kind, name in (
        ("ocr", "minicpmv ocr --parallel 1"), ("serve", "minicpmv serve --parallel 1, 1 clients"))}
    ratios = {"best_ocr_vs_best_llama_server": round(best_ocr / best_llama, 3) if best_ocr and best_llama else None,
              "serve_latency_vs_ocr_page": round(alone["serve"] / alone["ocr"], 3) if all(alone.values()) else None}
    label = f"{args.family}-{args.size}-{args.preset}"
    result = {"label": label, "pages": len(pages), "page_size": "x".join(map(str, PAGE_SIZE)),
              "new_tokens": args.new_tokens, "threads": args.threads, "context_per_sequence": args.context,
              "flows": flows, "ratios": ratios}
    save(f"throughput-{label}", result, lambda result: "\n".join([
        f"# Throughput: {label}, {len(pages)} dense {result['page_size']} pages, {args.new_tokens} new tokens "
        f"(EOS ignored), {args.threads} threads", "",
        "| flow | seconds | pages/min | median s per page or request | peak RSS MB | vs best llama-server |",
        "|---|---:|---:|---:|---:|---:|",
        *(f"| {name} | {row['seconds']:.1f} | {row['pages_per_min']:.2f} | {row['median_page_s']:.1f} | "
          f"{row['peak_rss_mb']:.0f} | "
          f"{'' if row['vs_best_llama_server'] is None else format(row['vs_best_llama_server'], '.2f') + 'x'} |"
          for name, row in result["flows"].items()), "",
        "Seconds per page: `minicpmv ocr`'s page records (model load excluded), each server request as its client "
        "timed it, each llama-mtmd-cli process (load included).", "",
        *(f"- {name.replace('_', ' ')}: {value}x" for name, value in result["ratios"].items() if value is not None),
        ""]))


if __name__ == "__main__":
    main()
