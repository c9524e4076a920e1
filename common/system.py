"""This process's resources: how many threads to run, and how much memory it has used at its peak."""

from __future__ import annotations

import resource

from .platform import MAXRSS_BYTES_PER_UNIT, proc_status_kib, usable_cpus


def default_threads() -> int:
    """Threads for llama.cpp and the quantizer when the caller names none: every CPU this process may use."""
    return max(1, usable_cpus())


def rusage_peak_bytes(usage: resource.struct_rusage) -> int:
    """ru_maxrss of a getrusage / os.wait4 result, in bytes."""
    return usage.ru_maxrss * MAXRSS_BYTES_PER_UNIT


def peak_rss_bytes() -> int:
    """This process's peak resident set size, in bytes."""
    return rusage_peak_bytes(resource.getrusage(resource.RUSAGE_SELF))


def peak_rss_mb() -> float:
    """This process's peak resident set size, in MiB."""
    return peak_rss_bytes() / 2**20


def children_peak_rss_bytes() -> int:
    """The largest peak resident set size of the children this process has waited for, in bytes."""
    return rusage_peak_bytes(resource.getrusage(resource.RUSAGE_CHILDREN))


def address_space_peak_rss_bytes() -> int:
    """The peak of this address space only (VmHWM), in bytes. getrusage's ru_maxrss survives exec, so a
    child exec'd by a parent that once held a large model would report the parent's peak; VmHWM starts
    afresh at exec. Falls back to peak_rss_bytes() where there is no VmHWM."""
    kib = proc_status_kib().get("VmHWM")
    return kib * 1024 if kib is not None else peak_rss_bytes()
