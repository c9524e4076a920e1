"""`minicpmv demo`: the whole path on the built-in tiny model. A synthetic checkpoint in the published
MiniCPM-V 4.5 layout is made once and cached with its conversion; one image question then runs through
the runtime. The weights are random, so the words are meaningless: the point is the path and its timings."""

from __future__ import annotations

import os
import shutil
from importlib.metadata import version
from pathlib import Path
from typing import Iterator

from PIL import Image, ImageDraw

DEMO_FAMILY = "minicpm-v-4.5"
DEMO_QUESTION = "What shapes and colours are in this picture?"


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "minicpmv-edge" / "demo"


def demo_image() -> Image.Image:
    image = Image.new("RGB", (640, 480), (240, 240, 230))
    draw = ImageDraw.Draw(image)
    draw.ellipse((60, 80, 260, 280), fill=(200, 40, 40))
    draw.rectangle((340, 160, 580, 400), fill=(40, 80, 200))
    draw.text((60, 420), "minicpmv-edge demo", fill=(20, 20, 20))
    return image


def prepared_model(preset: str = "q4_k_m") -> Path:
    """The converted tiny pair, built on first use and reused while the package version is unchanged."""
    from minicpmv_edge.convert import convert_checkpoint
    from minicpmv_edge.synthetic import make_checkpoint

    folder = cache_root() / f"{DEMO_FAMILY}-{preset}"
    stamp = folder / "stamp"
    wanted = f"minicpmv-edge {version('minicpmv-edge')}"
    if stamp.is_file() and stamp.read_text() == wanted:
        return folder / "gguf"
    shutil.rmtree(folder, ignore_errors=True)
    checkpoint = make_checkpoint(DEMO_FAMILY, folder / "checkpoint", size="tiny")
    convert_checkpoint(checkpoint, folder / "gguf", preset)
    stamp.write_text(wanted)
    return folder / "gguf"


def run_demo(max_new_tokens: int = 24) -> Iterator[object]:
    """Yield the runtime's response records for the demo question."""
    from minicpmv_edge.runtime import load

    model = load(prepared_model())
    try:
        msgs = [{"role": "user", "content": [demo_image(), DEMO_QUESTION]}]
        yield from model.stream_generate(msgs, max_new_tokens=max_new_tokens)
    finally:
        model.close()
