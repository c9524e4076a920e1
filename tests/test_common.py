"""The shared helpers in common/: atomic writes, this process's resources, the platform assumptions."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from minicpmv_edge.common.files import atomic_path, atomic_write, partial_path
from minicpmv_edge.common.platform import proc_status_kib, shared_library, usable_cpus
from minicpmv_edge.common.system import address_space_peak_rss_bytes, default_threads, peak_rss_bytes, peak_rss_mb


def test_atomic_write_replaces_whole_or_not_at_all(tmp_path: Path) -> None:
    target = tmp_path / "out.txt"
    target.write_text("old")
    atomic_write(target, b"new")
    assert target.read_text() == "new"

    def half_then_fail(f) -> None:  # noqa: ANN001 - a binary file
        f.write(b"half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space"):
        atomic_write(target, half_then_fail)
    assert target.read_text() == "new" and not partial_path(target).exists()
    with pytest.raises(KeyboardInterrupt), atomic_path(tmp_path / "other.bin") as partial:
        partial.write_bytes(b"x")
        raise KeyboardInterrupt
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]


def test_process_resources() -> None:
    assert default_threads() == max(1, usable_cpus()) >= 1
    assert peak_rss_bytes() > 2**20 and peak_rss_mb() == pytest.approx(peak_rss_bytes() / 2**20)
    assert address_space_peak_rss_bytes() > 2**20
    assert "VmRSS" in proc_status_kib() and proc_status_kib(-1) == {}
    assert shared_library(Path("/lib"), "ggml-base").name in ("libggml-base.so", "libggml-base.dylib")


def test_common_imports_neither_convert_nor_runtime() -> None:
    for path in (Path(__file__).parents[1] / "common").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            assert not any(n.startswith(("minicpmv_edge", "convert", "runtime", "cli")) for n in names), path
