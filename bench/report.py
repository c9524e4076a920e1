"""Where every benchmark writes: bench/results/<stem>.json and <stem>.md, each stamped with the machine and
its CPU flags, since figures from different CPUs (AVX2-only, AVX-512, VNNI, AMX) are never compared."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

from minicpmv_edge.common.platform import cpu_flags

RESULTS = Path(__file__).resolve().parent / "results"


def save(stem: str, result: dict[str, Any], markdown: Callable[[dict[str, Any]], str]) -> None:
    """Write the result as JSON and its table as Markdown, both with the machine, and print the table."""
    stamped = {**result, "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
               "cpu_flags": cpu_flags()}
    table = markdown(stamped).rstrip("\n") + "\n\n" + "\n".join([
        f"machine: {stamped['machine']}",
        f"cpu flags: {' '.join(stamped['cpu_flags']) or '(none of avx2/avx512*/vnni/amx)'}", ""])
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{stem}.json").write_text(json.dumps(stamped, indent=2) + "\n")
    (RESULTS / f"{stem}.md").write_text(table)
    print(table)


def child_result(label: str, command: list[str]) -> dict[str, Any]:
    """Run one measured flow in its own process (its own peak RSS, nothing warm from the others) and return the
    JSON object it prints last; a failed flow ends the benchmark with its stderr's tail."""
    proc = subprocess.run(command, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"{label} failed:\n{proc.stderr[-2000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    print(label, result, flush=True)
    return result
