"""Benchmark: one-pass conversion of a synthetic checkpoint (full published size by default) to GGUF.

Measures the converter as a user runs it (the CLI in a child process): wall time, peak RSS, bytes the
process wrote to disk, and the files it left. Writes JSON and a Markdown table under bench/results/.

    python bench/convert.py --family minicpm-v-4.5 --size full --preset q4_k_m --workdir /big/disk

The checkpoint is generated once into the workdir and reused. llama.cpp's own four-step flow on the same
layout was measured on this machine kind in ../shared/docs/peer-figures.md; its figures are quoted beside
ours for scale (pass --peer-json with a fresh measurement to replace them).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from minicpmv_edge.common.system import rusage_peak_bytes
from report import save  # bench/report.py

# llama.cpp's flow (surgery, image encoder, convert_hf_to_gguf F16, llama-quantize Q4_K_M) on the
# full-size 4.5 layout, 2 cores: ../shared/docs/peer-figures.md.
PEER_4_5_Q4_K_M = {"source": "shared/docs/peer-figures.md", "wall_s": 600.0, "peak_rss_bytes": int(15.7e9),
                   "bytes_written": int(38e9), "intermediate_f16_bytes": int(16.4e9)}


def run_measured(command: list[str]) -> dict:
    started = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - started
    stdout, stderr = proc.stdout.read().decode(), proc.stderr.read().decode()
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"command failed: {' '.join(command)}\n{stderr}")
    return {"wall_s": round(wall, 2), "peak_rss_bytes": rusage_peak_bytes(usage),
            "io_written_bytes": usage.ru_oublock * 512, "stdout": stdout}


def markdown(result: dict) -> str:
    ours, peer = result["ours"], result.get("peer")
    rows = [("minicpmv convert (one pass)", ours)] + ([("llama.cpp four steps (peer)", peer)] if peer else [])
    lines = [f"# Conversion: {result['family']} {result['size']} -> {result['preset']}", "",
             "| flow | wall s | peak RSS GiB | written GB |", "|---|---:|---:|---:|"]
    for name, row in rows:
        written = row.get("io_written_bytes", row.get("bytes_written", 0))
        lines.append(f"| {name} | {row['wall_s']:.0f} | {row['peak_rss_bytes'] / 2**30:.2f} | {written / 1e9:.2f} |")
    if peer:
        lines += ["", f"wall ratio ours/peer: {ours['wall_s'] / peer['wall_s']:.2f}; "
                      f"peak RSS ratio: {ours['peak_rss_bytes'] / peer['peak_rss_bytes']:.3f}"]
    lines += ["", f"output files: {', '.join(f'{n} ({s / 1e9:.2f} GB)' for n, s in ours['files'].items())}"]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", default="minicpm-v-4.5")
    parser.add_argument("--size", default="full", choices=["tiny", "full"])
    parser.add_argument("--preset", default="q4_k_m")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/minicpmv-bench"))
    parser.add_argument("--peer-json", type=Path, help="a measurement of llama.cpp's flow to show instead")
    args = parser.parse_args()

    from minicpmv_edge.synthetic import make_checkpoint

    checkpoint = args.workdir / f"{args.family}-{args.size}"
    generated_s = None
    if not (checkpoint / "config.json").is_file():
        started = time.perf_counter()
        make_checkpoint(args.family, checkpoint, size=args.size)
        generated_s = round(time.perf_counter() - started, 1)

    outdir = args.workdir / f"out-{args.family}-{args.size}-{args.preset}"
    for stale in outdir.glob("*") if outdir.exists() else []:
        stale.unlink()
    ours = run_measured([sys.executable, "-m", "minicpmv_edge.cli.main", "convert", str(checkpoint),
                         "-o", str(outdir), "-p", args.preset, "-q"])
    ours.pop("stdout")
    ours["files"] = {p.name: p.stat().st_size for p in sorted(outdir.iterdir())}

    peer = None
    if args.peer_json:
        peer = json.loads(args.peer_json.read_text())
    elif (args.family, args.size, args.preset) == ("minicpm-v-4.5", "full", "q4_k_m"):
        peer = PEER_4_5_Q4_K_M
    checkpoint_bytes = sum(p.stat().st_size for p in checkpoint.glob("*.safetensors"))
    result = {"family": args.family, "size": args.size, "preset": args.preset,
              "checkpoint_bytes": checkpoint_bytes, "checkpoint_generation_s": generated_s,
              "ours": ours, "peer": peer}
    save(f"convert-{args.family}-{args.size}-{args.preset}", result, markdown)


if __name__ == "__main__":
    main()
