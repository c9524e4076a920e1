"""Importing the converter, the runtime, the family registry or the synthetic factory imports neither torch nor
transformers: they are needed only while a synthetic checkpoint is written (and by the tests' references); nor
OpenCV (cv2), needed only when MiniCPM-OCR's small_image_upsize "adaptive" lays out an image; nor Ray, needed
only by `minicpmv ocr --ray`; nor PyAV (av), needed only when a video is read."""

from __future__ import annotations

import subprocess
import sys

PACKAGES = ("minicpmv_edge.convert", "minicpmv_edge.runtime", "minicpmv_edge.families", "minicpmv_edge.synthetic")


def run_python(code: str) -> None:
    """`code` in a fresh interpreter, whose modules are only those it imports; its assertions must hold."""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_no_torch_or_transformers_at_import() -> None:
    code = (f"import sys, {', '.join(PACKAGES)}\n"
            "heavy = sorted(m for m in ('torch', 'transformers', 'cv2', 'ray', 'av') if m in sys.modules)\n"
            "assert not heavy, f'imported: {heavy}'\n")
    run_python(code)


def test_no_submodule_imports_them_either() -> None:
    """Every module of those packages, imported one after the other in one process."""
    code = (f"import importlib, pkgutil, sys\n"
            f"for name in {PACKAGES!r}:\n"
            "    package = importlib.import_module(name)\n"
            "    for info in pkgutil.walk_packages(package.__path__, name + '.'):\n"
            "        importlib.import_module(info.name)\n"
            "        heavy = sorted(m for m in ('torch', 'transformers', 'cv2', 'ray', 'av') if m in sys.modules)\n"
            "        assert not heavy, f'{info.name} imported {heavy}'\n")
    run_python(code)


def test_only_the_server_imports_the_server_stack() -> None:
    """Starlette and uvicorn (the optional `server` extra) are imported by minicpmv_edge.server alone, not by
    the runtime, the converter or the CLI's module; the server imports none of the heavy packages either."""
    code = (f"import sys, {', '.join(PACKAGES)}, minicpmv_edge.cli.main\n"
            "stack = sorted(m for m in ('starlette', 'uvicorn', 'fastapi') if m in sys.modules)\n"
            "assert not stack, f'imported: {stack}'\n"
            "import minicpmv_edge.server\n"
            "heavy = sorted(m for m in ('torch', 'transformers', 'cv2', 'ray', 'av') if m in sys.modules)\n"
            "assert not heavy, f'the server imported: {heavy}'\n")
    run_python(code)
