"""The converter end to end on tiny checkpoints: the two files it writes, that llama.cpp loads them, and
how it fails on bad input (one line, non-zero exit, nothing left behind)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFReader
from llama_cpp import Llama
from PIL import Image

from minicpmv_edge.convert import ConversionError, convert_checkpoint, preset_names
from minicpmv_edge.runtime.vision import VisionTower


def load_pair(llm: Path, mmproj: Path) -> tuple[Llama, VisionTower]:
    model = Llama(str(llm), n_ctx=256, n_threads=2, logits_all=True, verbose=False)
    return model, VisionTower(mmproj, model.model, n_threads=2)


def gray_image(size: tuple[int, int] = (448, 448)) -> Image.Image:
    pixels = np.random.default_rng(0).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def test_q4_k_m_pair_loads_in_llama_cpp(family: str, converted, tiny_checkpoint) -> None:
    result = converted(family, "q4_k_m")
    assert sorted(p.name for p in result.llm_path.parent.iterdir()) == sorted(
        [result.llm_path.name, result.mmproj_path.name])
    assert "mmproj" in result.mmproj_path.name and "mmproj" not in result.llm_path.name
    assert result.tensor_types["llm"]["Q4_K"] > 0

    model, vision = load_pair(result.llm_path, result.mmproj_path)
    tokens = model.tokenize(b"Hello world", add_bos=False)
    model.eval(tokens)
    assert np.isfinite(model.scores[len(tokens) - 1]).all()

    config = json.loads((tiny_checkpoint(family) / "config.json").read_text())
    [embeddings] = vision.encode_image(gray_image())
    assert embeddings.shape == (config["query_num"], config["hidden_size"])
    assert np.isfinite(embeddings).all()
    vision.close()


@pytest.mark.parametrize("preset", [p for p in preset_names() if p != "q4_k_m"])
def test_every_preset_loads(preset: str, converted) -> None:
    result = converted("minicpm-v-4.5", preset)
    reader = GGUFReader(result.llm_path)
    assert reader.fields["general.file_type"].contents() == result.preset.llm_ftype
    model, vision = load_pair(result.llm_path, result.mmproj_path)
    model.eval(model.tokenize(b"Hi", add_bos=False))
    assert len(vision.encode_image(gray_image())) == 1
    vision.close()


def test_omni_audio_and_tts_tensors_are_skipped(converted, tiny_checkpoint) -> None:
    result = converted("minicpm-o-4.5", "f16")
    names = {t.name for path in (result.llm_path, result.mmproj_path) for t in GGUFReader(path).tensors}
    assert not [n for n in names if n.startswith(("apm", "tts", "audio"))]
    index = json.loads((tiny_checkpoint("minicpm-o-4.5") / "model.safetensors.index.json").read_text())
    assert any(name.startswith("apm.") for name in index["weight_map"])


# ---- bad input -------------------------------------------------------------------------------------------

def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "minicpmv_edge.cli.main", *args],
                          capture_output=True, text=True, timeout=300)


def broken_copy(tmp_path: Path, source: Path) -> Path:
    target = tmp_path / "ckpt"
    shutil.copytree(source, target)
    return target


def assert_clean_failure(proc: subprocess.CompletedProcess, outdir: Path, needle: str) -> None:
    assert proc.returncode == 1, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert needle in lines[0] and "Traceback" not in proc.stderr
    assert not outdir.exists() or not any(outdir.iterdir())


def _drop_shard(ckpt: Path) -> None:
    sorted(ckpt.glob("*.safetensors"))[-1].unlink()


def _truncate_shard(ckpt: Path) -> None:
    shard = sorted(ckpt.glob("*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])


def edit_config(section: str | None = None, /, **changes: object) -> callable:
    """Set keys of config.json (or of its `section`, e.g. text_config); None removes a key."""
    def edit(ckpt: Path) -> None:
        config = json.loads((ckpt / "config.json").read_text())
        target = config if section is None else config[section]
        for key, value in changes.items():
            if value is None:
                target.pop(key)
            else:
                target[key] = value
        (ckpt / "config.json").write_text(json.dumps(config))
    return edit


@pytest.mark.parametrize("damage, needle", [
    (_drop_shard, "missing shard"),
    (_truncate_shard, "not a readable safetensors file"),
    (edit_config(version=9.9), "unsupported model"),
    (edit_config(query_num=None), "lacks the key 'query_num'"),
    (edit_config(num_hidden_layers=None), "lacks the key 'num_hidden_layers'"),
])
def test_bad_checkpoint_fails_in_one_line(tmp_path: Path, tiny_checkpoint, damage, needle: str) -> None:
    ckpt = broken_copy(tmp_path, tiny_checkpoint("minicpm-v-4.5"))
    damage(ckpt)
    outdir = tmp_path / "out"
    assert_clean_failure(run_cli("convert", str(ckpt), "-o", str(outdir), "-q"), outdir, needle)


def test_unwritable_outdir_and_unknown_source(tmp_path: Path, tiny_checkpoint) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    proc = run_cli("convert", str(tiny_checkpoint("minicpm-v-4.5")), "-o", str(blocker / "out"), "-q")
    assert_clean_failure(proc, blocker / "out", "cannot create output folder")
    proc = run_cli("convert", str(tmp_path / "nowhere" / "at_all"), "-o", str(tmp_path / "o"), "-q")
    assert_clean_failure(proc, tmp_path / "o", "neither a local folder nor a hub repo id")
    proc = run_cli("convert", str(tiny_checkpoint("minicpm-v-4.5")), "-o", str(tmp_path / "o"), "-p", "q3_x")
    assert_clean_failure(proc, tmp_path / "o", "unknown preset")


def test_no_disk_space_is_reported_before_writing(tmp_path: Path, tiny_checkpoint, monkeypatch) -> None:
    import minicpmv_edge.convert.gguf_out as gguf_out

    monkeypatch.setattr(gguf_out.shutil, "disk_usage", lambda _: shutil._ntuple_diskusage(1, 1, 1))
    with pytest.raises(ConversionError, match="not enough disk space"):
        convert_checkpoint(tiny_checkpoint("minicpm-v-4.5"), tmp_path / "out", "q4_k_m")
    assert not any((tmp_path / "out").iterdir())


def test_interrupted_conversion_leaves_nothing(tmp_path: Path, tiny_checkpoint) -> None:
    calls = []

    def interrupt(done: int, total: int) -> None:
        calls.append(done)
        if done > total // 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        convert_checkpoint(tiny_checkpoint("minicpm-v-4.5"), tmp_path / "out", "q4_k_m", progress=interrupt)
    assert calls and not any((tmp_path / "out").iterdir())


def test_cli_prints_paths_and_summary(tmp_path: Path, tiny_checkpoint) -> None:
    proc = run_cli("convert", str(tiny_checkpoint("minicpm-v-2.6")), "-o", str(tmp_path / "o"), "-p", "q8_0")
    assert proc.returncode == 0, proc.stderr
    paths = [Path(line) for line in proc.stdout.split()]
    assert len(paths) == 2 and all(p.is_file() for p in paths)
    assert "peak RSS" in proc.stderr and "Q8_0" in proc.stderr
