"""The runtime and its CLI on a tiny converted model: chat() shapes, KV-cache reuse across turns, image
inputs of every kind, and one-line errors for bad input."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from minicpmv_edge.runtime import EngineError, ImageInputError, load
from minicpmv_edge.runtime.images import load_image


@pytest.fixture(scope="module")
def model_dir(converted) -> Path:  # noqa: ANN001
    return converted("minicpm-v-4.5", "q8_0").llm_path.parent


@pytest.fixture(scope="module")
def model(model_dir: Path):  # noqa: ANN201
    loaded = load(model_dir, n_ctx=512)
    yield loaded
    loaded.close()


def picture(size: tuple[int, int] = (500, 300), seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def test_chat_returns_answer_and_streams_the_same_text(model) -> None:
    msgs = [{"role": "user", "content": [picture(), "What is in the image?"]}]
    answer = model.chat(msgs, max_new_tokens=12)
    streamed = "".join(model.chat(msgs, max_new_tokens=12, stream=True))
    assert answer.text == streamed.strip()
    assert answer.timings["generation_tokens"] <= 12 and answer.timings["peak_rss_mb"] > 0


def test_second_turn_reuses_cache_and_image_embeddings(model) -> None:
    image = picture(seed=1)
    first = [{"role": "user", "content": [image, "Describe it."]}]
    answer = model.chat(first, max_new_tokens=6)
    encoded = model.embeddings.keys()
    follow_up = first + [{"role": "assistant", "content": answer}, {"role": "user", "content": "More?"}]
    items, encode_ms = model.prepare(follow_up)
    assert encode_ms == 0.0 and model.embeddings.keys() == encoded
    decoded = model.engine.feed(items, model.embeddings)
    assert decoded < len(items) // 2  # only the new turn's tokens


def test_prompt_longer_than_the_model_context_is_refused(model) -> None:
    with pytest.raises(EngineError, match="context holds"):
        model.chat([{"role": "user", "content": "word " * 50_000}], max_new_tokens=1)


@pytest.mark.parametrize("mode", ["P", "RGBA", "CMYK", "L", "I;16", "LA"])
def test_every_image_mode_becomes_rgb(mode: str) -> None:
    source = picture((64, 48)).convert("RGBA" if mode in ("RGBA", "LA") else "RGB")
    image = source.convert(mode) if mode != "I;16" else Image.fromarray(
        (np.asarray(source.convert("L"), dtype=np.uint16) * 257))
    buffer = io.BytesIO()
    image.save(buffer, format="TIFF" if mode in ("I;16", "CMYK") else "PNG")
    loaded = load_image(buffer.getvalue())
    assert loaded.mode == "RGB" and loaded.size == (64, 48)


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    image = picture((80, 40))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    path = tmp_path / "rotated.jpg"
    image.save(path, exif=exif)
    assert load_image(path).size == (40, 80)


def test_bad_images_are_refused(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "notes.txt").write_text("not an image")
    with pytest.raises(ImageInputError, match="not an image"):
        load_image(tmp_path / "notes.txt")
    with pytest.raises(ImageInputError, match="not found"):
        load_image(tmp_path / "missing.png")
    import minicpmv_edge.runtime.images as images

    monkeypatch.setattr(images, "MAX_PIXELS", 100)
    with pytest.raises(ImageInputError, match="pixel limit"):
        load_image(picture((20, 20)))


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "minicpmv_edge.cli.main", *args], capture_output=True, text=True,
                          timeout=300)


def test_cli_ask_json_and_info(model_dir: Path, tmp_path: Path) -> None:
    image = tmp_path / "photo.png"
    picture().save(image)
    proc = run_cli("ask", str(model_dir), "--image", str(image), "-n", "5", "-t", "1", "--temperature", "0",
                   "--json", "What is this?")
    assert proc.returncode == 0, proc.stderr
    record = json.loads(proc.stdout)
    assert set(record) == {"answer", "timings"} and record["timings"]["generation_tokens"] <= 5
    [gguf] = [p for p in model_dir.glob("*.gguf") if "mmproj" not in p.name]
    proc = run_cli("info", str(gguf))
    assert proc.returncode == 0 and "minicpm-v-4.5" in proc.stdout


@pytest.mark.parametrize("args, needle", [
    (["--image", "{tmp}/missing.png", "Q?"], "image not found"),
    (["--image", "{tmp}/notes.txt", "Q?"], "not an image"),
])
def test_cli_bad_input_is_one_line(model_dir: Path, tmp_path: Path, args: list[str], needle: str) -> None:
    (tmp_path / "notes.txt").write_text("text")
    proc = run_cli("ask", str(model_dir), *[a.format(tmp=tmp_path) for a in args])
    assert proc.returncode == 1
    assert proc.stderr.strip().count("\n") == 0 and needle in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("args, needle", [
    (["ask", "{tmp}"], "one question after MODEL"),
    (["ask", "{tmp}", "Q?", "and another"], "one question after MODEL"),
    (["ask", "{tmp}", "-t", "0", "Q?"], "'--threads'"),
    (["ask", "{tmp}", "--temperature=-1", "Q?"], "'--temperature'"),
    (["chat", "{tmp}", "extra"], "nothing follows MODEL"),
])
def test_cli_usage_errors_exit_2_with_the_usage(tmp_path: Path, args: list[str], needle: str) -> None:
    proc = run_cli(*[a.format(tmp=tmp_path) for a in args])
    assert proc.returncode == 2 and f"Usage: minicpmv {args[0]}" in proc.stderr and needle in proc.stderr, proc.stderr


def test_cli_missing_model_is_one_line(tmp_path: Path) -> None:
    proc = run_cli("ask", str(tmp_path), "Q?")
    assert proc.returncode == 1 and "should hold one model GGUF" in proc.stderr
    proc = run_cli("info", str(tmp_path / "none.gguf"))
    assert proc.returncode == 1 and "not a readable GGUF" in proc.stderr


def test_thinking_switch_follows_the_template(model) -> None:
    from minicpmv_edge.runtime.model import split_reasoning

    msgs = [{"role": "user", "content": "Why is the sky blue?"}]
    off = model.engine.tokenize(model.prompt.template.render(messages=msgs, add_generation_prompt=True,
                                                      enable_thinking=False))
    items_off, _ = model.prepare(msgs, enable_thinking=False)
    items_on, _ = model.prepare(msgs, enable_thinking=True)
    assert items_off == off and items_on != items_off
    assert items_off[-len(model.engine.tokenize("<think>\n\n</think>\n\n")):] == \
        model.engine.tokenize("<think>\n\n</think>\n\n")
    assert split_reasoning("<think>\nRayleigh scattering.\n</think>\n\nBlue light scatters more.") == (
        "Rayleigh scattering.", "\n\nBlue light scatters more.")
    assert split_reasoning("No thinking here.") == ("", "No thinking here.")


def test_cli_chat_session(model_dir: Path, tmp_path: Path) -> None:
    image = tmp_path / "photo.png"
    picture().save(image)
    script = f"/image {image}\nWhat is this?\n/think on\nAnd now?\n/reset\n/image {tmp_path}/nope.png\n/quit\n"
    proc = subprocess.run([sys.executable, "-m", "minicpmv_edge.cli.main", "chat", str(model_dir), "-n", "4"],
                          input=script, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "1 image(s) attached" in proc.stderr and "thinking on" in proc.stderr
    assert "image not found" in proc.stderr


def test_vision_path_errors_are_the_runtime_s_one_line_errors(model) -> None:
    from minicpmv_edge.runtime import VisionError
    from minicpmv_edge.runtime.clip_encoder import check_compatible

    with pytest.raises(VisionError, match=r"piece of 450x448 is not a multiple of the 14-pixel patch"):
        model.vision.encoder.encode(picture((450, 448)))
    with pytest.raises(VisionError, match=r"llama-cpp-python 0\.3\.35 is installed.*pip install llama-cpp-python==0\.3\.36"):
        check_compatible("0.3.35")
    check_compatible()  # the installed one is the pinned one


def test_the_declared_clip_layout_is_the_pinned_release() -> None:
    import tomllib

    from minicpmv_edge.runtime.clip_encoder import DECLARED_FOR

    project = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]
    assert f"llama-cpp-python=={DECLARED_FOR}" in project["dependencies"]


def test_embedding_memory_is_least_recently_used_and_keeps_what_is_protected() -> None:
    from minicpmv_edge.runtime.embedding_cache import EmbeddingMemory

    memory = EmbeddingMemory(max_bytes=3 * 400)
    for key in "abcd":
        memory.put(key, np.zeros(100, dtype=np.float32))  # 400 bytes each
    memory.get("a")  # used again: b is now the oldest
    memory.trim(protected=["b"])
    assert memory.keys() == ["b", "d", "a"] and memory.nbytes == 1200
    memory.trim(protected=[])
    assert memory.nbytes <= 1200
    memory.put("e", np.zeros(100, dtype=np.float32))
    memory.trim(protected="bdae")  # all protected: over the bound, nothing dropped
    assert len(memory) == 4 and memory.nbytes == 1600


def test_a_long_batch_keeps_the_embedding_memory_bounded(model_dir: Path) -> None:
    with load(model_dir, n_ctx=512, embedding_memory_bytes=0) as bounded:
        bounded.chat([{"role": "user", "content": [picture((448, 448), 0), "Hi"]}], max_new_tokens=1, sampling=False)
        piece = bounded.embeddings.nbytes  # the current prompt's piece stays, bound or not
        bounded.embeddings.max_bytes = 2 * piece
        for seed in range(1, 7):
            bounded.chat([{"role": "user", "content": [picture((448, 448), seed), "Hi"]}], max_new_tokens=1,
                         max_slice_nums=1, sampling=False)
            assert bounded.embeddings.nbytes <= 2 * piece
        # Everything the current conversation shows stays, even past the bound.
        many = [{"role": "user", "content": [*(picture((448, 448), s) for s in range(10, 14)), "Compare."]}]
        bounded.chat(many, max_new_tokens=1, max_slice_nums=1, sampling=False)
        assert len(bounded.embeddings) == 4
        _, encode_ms = bounded.prepare(many, max_slice_nums=1)
        assert encode_ms == 0.0


def test_cli_hub_model_offline_without_cache_is_one_line(tmp_path: Path) -> None:
    import os

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub")}
    proc = subprocess.run([sys.executable, "-m", "minicpmv_edge.cli.main", "ask", "openbmb/MiniCPM-V-4_5-gguf:Q4_K_M",
                           "Hi"], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.count("\n") == 1 and "openbmb/MiniCPM-V-4_5-gguf" in proc.stderr and "offline" in proc.stderr
