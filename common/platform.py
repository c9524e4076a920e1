"""Every assumption about the operating system and the C++ ABI, in one place.

Today the project runs on Linux (glibc, libstdc++; x86-64 and aarch64). Each item says, in one line, what
macOS would need; nothing here has been run on macOS or Windows."""

from __future__ import annotations

import os
import sys
from pathlib import Path

IS_MACOS = sys.platform == "darwin"

# Shared libraries llama-cpp-python installs in llama_cpp/lib are lib<name>.so. macOS: lib<name>.dylib.
# (libllama and libmtmd are opened by llama-cpp-python itself, which picks the suffix; we open only
# libggml-base by name, and reach libmtmd through llama_cpp.mtmd_cpp._libmtmd, the handle it loaded.)
SHARED_LIBRARY_SUFFIX = ".dylib" if IS_MACOS else ".so"


def shared_library(folder: Path, name: str) -> Path:
    """lib<name>.so in `folder` (e.g. shared_library(lib_dir, "ggml-base"))."""
    return folder / f"lib{name}{SHARED_LIBRARY_SUFFIX}"


# clip.cpp functions libmtmd exports with C++ linkage, called by their mangled names: Itanium C++ ABI names
# as g++ spells them against libstdc++ (std::vector<float> is St6vectorIfSaIfEE). macOS: clang with libc++
# mangles std::vector as NSt3__16vector...; read the names off the built libmtmd with `nm -gU`.
CLIP_IMAGE_ENCODE = "_Z17clip_image_encodeP8clip_ctxiPK14clip_image_f32RSt6vectorIfSaIfEE"
CLIP_N_OUTPUT_TOKENS = "_Z20clip_n_output_tokensPK8clip_ctxPK14clip_image_f32"

# getrusage's ru_maxrss is in KiB on Linux. macOS: in bytes (this factor becomes 1 there).
MAXRSS_BYTES_PER_UNIT = 1 if IS_MACOS else 1024


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity mask, which a container or taskset narrows).
    macOS has no sched_getaffinity: os.cpu_count() (every core)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def proc_status_kib(pid: int | str = "self") -> dict[str, int]:
    """The Vm* lines of /proc/<pid>/status (VmRSS, VmHWM, ...) in KiB; {} when it cannot be read.
    macOS has no /proc: task_info(MACH_TASK_BASIC_INFO) gives a process's resident size, not its peak."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return {}
    fields = (line.split() for line in text.splitlines() if line.startswith("Vm"))
    return {f[0].rstrip(":"): int(f[1]) for f in fields if len(f) == 3 and f[2] == "kB"}


def cpu_flags() -> list[str]:
    """The SIMD flags that decide llama.cpp's kernels (avx2, avx512*, *vnni, amx*) from /proc/cpuinfo; [] elsewhere.
    macOS: `sysctl machdep.cpu` (x86-64) or hw.optional.* (Apple silicon)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return []
    for line in lines:
        if line.startswith("flags"):
            return sorted(f for f in line.split(":", 1)[1].split()
                          if f == "avx2" or f.startswith(("avx512", "amx")) or "vnni" in f)
    return []
