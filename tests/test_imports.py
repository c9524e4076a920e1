"""Importing the converter, the runtime, the family registry or the synthetic factory imports neither torch nor
transformers: they are needed only while a synthetic checkpoint is written (and by the tests' references); nor
OpenCV (cv2), needed only when MiniCPM-OCR's small_image_upsize "adaptive" lays out an image."""

from __future__ import annotations

import subprocess
import sys

PACKAGES = ("minicpmv_edge.convert", "minicpmv_edge.runtime", "minicpmv_edge.families", "minicpmv_edge.synthetic")


def test_no_torch_or_transformers_at_import() -> None:
    code = (f"import sys, {', '.join(PACKAGES)}\n"
            "heavy = sorted(m for m in ('torch', 'transformers', 'cv2') if m in sys.modules)\n"
            "assert not heavy, f'imported: {heavy}'\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_no_submodule_imports_them_either() -> None:
    """Every module of those packages, imported one after the other in one process."""
    code = (f"import importlib, pkgutil, sys\n"
            f"for name in {PACKAGES!r}:\n"
            "    package = importlib.import_module(name)\n"
            "    for info in pkgutil.walk_packages(package.__path__, name + '.'):\n"
            "        importlib.import_module(info.name)\n"
            "        heavy = sorted(m for m in ('torch', 'transformers', 'cv2') if m in sys.modules)\n"
            "        assert not heavy, f'{info.name} imported {heavy}'\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
