"""Benchmark: one image question through our runtime and, in the same run, through llama-cpp-python's own
MiniCPM-V chat handler on the same GGUF pair (and llama-mtmd-cli when --mtmd-cli is given).

Each engine runs in its own child process so peak RSS is its own. Reported: image encode ms (ours:
measured; peer: time to first token minus a text-only prefill is not separable, so its TTFT is shown),
time to first token, decode tokens/s, peak RSS. JSON and Markdown under bench/results/.

    python bench/runtime.py --model-dir /tmp/minicpmv-bench/out-minicpm-v-4.5-full-q4_k_m --label full
    python bench/runtime.py --tiny          # converts the demo's tiny model and benchmarks that
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import subprocess
import sys
import time
from pathlib import Path

from minicpmv_edge.common.system import address_space_peak_rss_bytes, children_peak_rss_bytes, default_threads
from report import child_result, save  # bench/report.py

QUESTION = "Describe this picture in detail."


def bench_image() -> bytes:
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (448, 448), (235, 235, 225))
    draw = ImageDraw.Draw(image)
    draw.ellipse((40, 60, 220, 240), fill=(200, 40, 40))
    draw.rectangle((240, 200, 420, 400), fill=(40, 80, 200))
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def run_ours(model: Path | tuple[Path, Path], max_new_tokens: int, n_ctx: int = 2048, repack: bool = False) -> dict:
    """One question about the bench image; `model` is a converted folder or a (model GGUF, mmproj GGUF) pair."""
    from minicpmv_edge.runtime import load

    started = time.perf_counter()
    model = load(*(model if isinstance(model, tuple) else (model,)), n_ctx=n_ctx, repack=repack)
    loaded = time.perf_counter()
    msgs = [{"role": "user", "content": [bench_image(), QUESTION]}]
    first = last = None
    for record in model.stream_generate(msgs, max_new_tokens=max_new_tokens):
        first = first or time.perf_counter()
        last = record
    return {"load_s": loaded - started, "image_encode_ms": last.image_encode_ms,
            "time_to_first_token_s": first - loaded, "prompt_tokens": last.prompt_tokens,
            "prefill_tokens_per_s": last.prefill_tokens_per_s, "generated_tokens": last.generation_tokens,
            "decode_tokens_per_s": last.decode_tokens_per_s}


def run_peer(model_dir: Path, max_new_tokens: int, n_ctx: int) -> dict:
    from llama_cpp import Llama
    from llama_cpp.llama_chat_format import MiniCPMv26ChatHandler

    [model_path] = [p for p in model_dir.glob("*.gguf") if "mmproj" not in p.name]
    [mmproj] = list(model_dir.glob("mmproj*.gguf"))
    started = time.perf_counter()
    llm = Llama(str(model_path), chat_handler=MiniCPMv26ChatHandler(clip_model_path=str(mmproj), verbose=False),
                n_ctx=n_ctx, n_threads=default_threads(), verbose=False)
    loaded = time.perf_counter()
    url = "data:image/png;base64," + base64.b64encode(bench_image()).decode()
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                             {"type": "text", "text": QUESTION}]}]
    first, count = None, 0
    for _ in llm.create_chat_completion(messages=messages, max_tokens=max_new_tokens, temperature=0.0,
                                        stream=True):
        first = first or time.perf_counter()
        count += 1
    done = time.perf_counter()
    return {"load_s": loaded - started, "time_to_first_token_s": first - loaded, "generated_tokens": count,
            "decode_tokens_per_s": (count - 1) / (done - first) if count > 1 else 0.0}


def run_mtmd_cli(model_dir: Path, max_new_tokens: int, n_ctx: int, cli: str) -> dict:
    [model_path] = [p for p in model_dir.glob("*.gguf") if "mmproj" not in p.name]
    [mmproj] = list(model_dir.glob("mmproj*.gguf"))
    image = Path("/tmp/minicpmv-bench-image.png")
    image.write_bytes(bench_image())
    started = time.perf_counter()
    subprocess.run([cli, "-m", str(model_path), "--mmproj", str(mmproj), "--image", str(image), "-p", QUESTION,
                    "-n", str(max_new_tokens), "-c", str(n_ctx), "--temp", "0"], check=True, capture_output=True)
    return {"wall_s": time.perf_counter() - started}


def child(engine: str, model_dir: Path, max_new_tokens: int, n_ctx: int, cli: str | None) -> dict:
    runner = {"ours": run_ours, "llama-cpp-python chat handler": run_peer,
              "ours, weight repacking on": lambda *a: run_ours(*a, repack=True)}
    result = (run_mtmd_cli(model_dir, max_new_tokens, n_ctx, cli) if engine == "llama-mtmd-cli"
              else runner[engine](model_dir, max_new_tokens, n_ctx))
    # This child's own peak (VmHWM: ru_maxrss would include the parent's before exec), or the CLI's.
    result["peak_rss_bytes"] = (children_peak_rss_bytes() if engine == "llama-mtmd-cli"
                                else address_space_peak_rss_bytes())
    return result


def engine_table(engines: dict[str, dict], columns: list[tuple[str, str, str]]) -> list[str]:
    """Markdown lines, a row per engine; columns are (header, result key, format), "-" where a row lacks it."""
    lines = ["| engine | " + " | ".join(header for header, _, _ in columns) + " |",
             "|---|" + "---:|" * len(columns)]
    for name, row in engines.items():
        row = {**row, "peak_rss_gib": row["peak_rss_bytes"] / 2**30}
        lines.append(f"| {name} | " + " | ".join(format(row[key], fmt) if key in row else "-"
                                                 for _, key, fmt in columns) + " |")
    return lines


def markdown(result: dict) -> str:
    lines = [f"# Runtime: {result['label']} ({result['gguf_bytes'] / 1e9:.2f} GB of GGUF), one 448x448 image, "
             f"{result['max_new_tokens']} new tokens", ""]
    lines += engine_table(result["engines"], [
        ("load s", "load_s", ".1f"), ("image encode ms", "image_encode_ms", ",.0f"),
        ("TTFT s", "time_to_first_token_s", ".2f"), ("decode tok/s", "decode_tokens_per_s", ".2f"),
        ("peak RSS GiB", "peak_rss_gib", ".2f")])
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", type=Path)
    parser.add_argument("--tiny", action="store_true", help="benchmark the demo's tiny model")
    parser.add_argument("--label", default=None)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--n-ctx", type=int, default=2048)
    parser.add_argument("--mtmd-cli", help="path to a llama-mtmd-cli binary to time as well")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.tiny:
        from minicpmv_edge.cli.demo import prepared_model

        args.model_dir, args.label = prepared_model(), args.label or "tiny"
    if args.child:
        print(json.dumps(child(args.child, args.model_dir, args.max_new_tokens, args.n_ctx, args.mtmd_cli)))
        return

    engines = ["ours", "ours, weight repacking on", "llama-cpp-python chat handler"]
    engines += ["llama-mtmd-cli"] if args.mtmd_cli else []
    results = {}
    for engine in engines:
        command = [sys.executable, __file__, "--model-dir", str(args.model_dir), "--child", engine,
                   "--max-new-tokens", str(args.max_new_tokens), "--n-ctx", str(args.n_ctx)]
        if args.mtmd_cli:
            command += ["--mtmd-cli", args.mtmd_cli]
        results[engine] = child_result(engine, command)
    label = args.label or args.model_dir.name
    result = {"label": label, "max_new_tokens": args.max_new_tokens, "n_ctx": args.n_ctx,
              "gguf_bytes": sum(p.stat().st_size for p in args.model_dir.glob("*.gguf")), "engines": results}
    save(f"runtime-{label}", result, markdown)


if __name__ == "__main__":
    main()
