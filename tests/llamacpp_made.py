"""GGUF pairs made by llama.cpp's own converters (not ours), for tests that compare with or run on them.

`build_pair(family, checkpoint, out_dir)` converts a synthetic checkpoint the way a user following the
pinned llama-cpp-python sdist's `vendor/llama.cpp/docs/multimodal/minicpm*.md` would, running the sdist's
files in subprocesses with `PYTHONPATH=<llama.cpp>/gguf-py` (their own gguf-py); nothing of llama.cpp is
copied into this repository.

Resampler families (2.5, 2.6, o-2.6, 4.0, 4.5, o-4.5), the legacy flow of `tools/mtmd/legacy-models/`:
  1. `minicpmv-surgery.py -m DIR`: EMULATED, see below.
  2. `minicpmv-convert-image-encoder-to-gguf.py -m DIR --minicpmv-projector DIR/minicpmv.projector
     --output-dir DIR --image-mean 0.5 0.5 0.5 --image-std 0.5 0.5 0.5 --minicpmv_version N`, verbatim
     (N per the docs: 2.5 -> 2, 2.6 -> 3, o-2.6 -> 4, 4.0 -> 5, 4.5 -> 6; o-4.5 has no doc page, 100045 is
     the value the script's --help and clip.cpp give it). Writes DIR/mmproj-model-f16.gguf.
  3. `convert_hf_to_gguf.py DIR/model --outtype f16`, through the runner below.
MiniCPM-V 4.6: `convert_hf_to_gguf.py DIR --outtype f16 --no-mtp` and `convert_hf_to_gguf.py DIR --mmproj
--outtype f16`, through the runner. `--no-mtp` because without it the converter declares
`qwen35.nextn_predict_layers = 1` and block_count 5 (config `mtp_num_hidden_layers: 1`) but writes no blk.4
tensor (the checkpoint has no `mtp.*` tensors, and MiniCPMV4_6TextModel.filter_tensors drops them anyway), so
llama.cpp refuses the file.
DIR is a copy of the checkpoint (the flow writes into the model folder; the shared fixture stays untouched).

What is emulated, and why: `minicpmv-surgery.py` loads the model with `AutoModel.from_pretrained(DIR,
trust_remote_code=True)`, i.e. the published modeling_minicpmv.py / modeling_minicpmo.py, which synthetic
checkpoints do not ship. `surgery()` does the same split of the state dict without that code:
  - `resampler.*` -> DIR/minicpmv.projector (torch.save, float32), `resampler.proj` divided by the LLM
    config's `scale_emb` when it has one (no synthetic family has);
  - `vpm.*` -> DIR/minicpmv.clip (float32, every "vpm." removed), and DIR/added_tokens.json emptied to "{}";
  - `llm.*` -> DIR/model as `model.llm.save_pretrained` writes it: model.safetensors (bf16, the dtype the
    script loads in, "llm." prefix removed), config.json = the checkpoint's config with `architectures`
    set to the published LLM class (LlamaForCausalLM for 2.5 and 4.0, Qwen2ForCausalLM for 2.6 / o-2.6,
    Qwen3ForCausalLM for 4.5 / o-4.5; the remote MiniCPMV shares its config object with `self.llm`) and
    the script's MiniCPM `auto_map`, plus a generation_config.json derived from it; tokenizer files copied
    from the checkpoint as `tok.save_pretrained` of the published fast tokenizer writes them under
    llama.cpp's pinned transformers 4.x (tokenizer.json, tokenizer_config.json, special_tokens_map.json and
    the slow files vocab.json + merges.txt / tokenizer.model, added_tokens.json). transformers 5 (this
    venv's) would drop tokenizer.model on save and so switch 4.0 to another llama.cpp vocab path.
  Not reproduced: save_pretrained's config diffing against the remote config class's defaults, which can
  only drop keys, and the apm / tts tensors, which the surgery ignores too.
Everything runs with this venv's torch / transformers (5.x), not llama.cpp's requirements pins. stdin is
/dev/null: the surgery's auto_map names remote code that is not there, so transformers asks (and gets "no").
Known: the tiny 4.6 pair loads, but the converter's default `qwen35.rope.dimension_sections` [11, 11, 10, 0]
(no `mrope_section` in the config) exceeds the tiny model's 4 rotary dims, so decoding aborts in ggml
(GGML_ASSERT(sect_dims <= ne0)); do not generate with it in-process.

Tokenizer hashes: convert_hf_to_gguf refuses BPE tokenizers whose test-string encoding hash is unknown, and
the tiny synthetic tokenizers' hashes are. The runner (`RUNNER`, run with `python -c`) imports the sdist's
`conversion.base` and replaces `TextModel.get_vocab_base_pre` with one returning the published model's
pre-tokenizer name (`PRE_TOKENIZER`), then runs convert_hf_to_gguf.py as __main__ with the given arguments.
4.0's sentencepiece vocab never asks.

Sources (`llama_cpp_source`): $MINICPMV_LLAMA_CPP_SDIST (an extracted sdist, its vendor/llama.cpp, or the
.tar.gz), else ~/.cache/minicpmv-edge/llama_cpp_python-<version>/, else `pip download --no-deps
--no-binary :all: llama-cpp-python==<version>` extracted there. <version> is the installed
`llama_cpp.__version__`. Only the files the flow uses are extracted. Failure: `LlamaCppUnavailable`.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SDIST_ENV = "MINICPMV_LLAMA_CPP_SDIST"
CACHE_ROOT = Path.home() / ".cache" / "minicpmv-edge"
LEGACY_DIR = "tools/mtmd/legacy-models"
IMAGE_ENCODER_SCRIPT = f"{LEGACY_DIR}/minicpmv-convert-image-encoder-to-gguf.py"
# What the flow runs or reads; a cached or given copy must hold these (relative to vendor/llama.cpp).
NEEDED = ("convert_hf_to_gguf.py", "conversion/base.py", "gguf-py/gguf/__init__.py", IMAGE_ENCODER_SCRIPT)
EXTRACTED = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/", f"{LEGACY_DIR}/", "docs/multimodal/",
             "LICENSE", "requirements")
STEP_TIMEOUT = 900

# docs/multimodal/minicpm*.md's --minicpmv_version (o-4.5: the script's --help / clip.cpp).
MINICPMV_VERSION = {
    "minicpm-llama3-v-2.5": 2, "minicpm-v-2.6": 3, "minicpm-o-2.6": 4, "minicpm-v-4.0": 5,
    "minicpm-v-4.5": 6, "minicpm-o-4.5": 100045,
}
# The class of the published remote model's `self.llm`, i.e. what model.llm.save_pretrained names.
LLM_CLASS = {
    "minicpm-llama3-v-2.5": "LlamaForCausalLM", "minicpm-v-2.6": "Qwen2ForCausalLM",
    "minicpm-o-2.6": "Qwen2ForCausalLM", "minicpm-v-4.0": "LlamaForCausalLM",
    "minicpm-v-4.5": "Qwen3ForCausalLM", "minicpm-o-4.5": "Qwen3ForCausalLM",
}
MERGER = ("minicpm-v-4.6", "minicpm-v-4.6-thinking")
# The name convert_hf_to_gguf's hash table gives the published tokenizer; None: sentencepiece, not asked.
PRE_TOKENIZER: dict[str, str | None] = {
    "minicpm-llama3-v-2.5": "llama-bpe", "minicpm-v-2.6": "qwen2", "minicpm-o-2.6": "qwen2",
    "minicpm-v-4.0": None, "minicpm-v-4.5": "qwen2", "minicpm-o-4.5": "qwen2",
    "minicpm-v-4.6": "qwen35", "minicpm-v-4.6-thinking": "qwen35",
}
# minicpmv-surgery.py's replacement auto_map, verbatim values.
SURGERY_AUTO_MAP = {
    "AutoConfig": "configuration_minicpm.MiniCPMConfig",
    "AutoModel": "modeling_minicpm.MiniCPMModel",
    "AutoModelForCausalLM": "modeling_minicpm.MiniCPMForCausalLM",
    "AutoModelForSeq2SeqLM": "modeling_minicpm.MiniCPMForCausalLM",
    "AutoModelForSequenceClassification": "modeling_minicpm.MiniCPMForSequenceClassification",
}
NOT_TOKENIZER = {"config.json", "generation_config.json", "preprocessor_config.json", "processor_config.json",
                 "model.safetensors.index.json", "minicpmv.projector", "minicpmv.clip"}

RUNNER = r"""
import runpy, sys
llama_dir, pre = sys.argv[1], sys.argv[2]
sys.path.insert(0, llama_dir)
if pre:
    from conversion.base import TextModel
    TextModel.get_vocab_base_pre = lambda self, tokenizer: pre
sys.argv = [llama_dir + "/convert_hf_to_gguf.py", *sys.argv[3:]]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


class LlamaCppUnavailable(RuntimeError):
    """llama.cpp's converters could not be found or fetched (the message is one line)."""


class ConversionFailed(RuntimeError):
    pass


# ---- the sdist -------------------------------------------------------------------------------------------

def pinned_version() -> str:
    try:
        import llama_cpp
    except Exception as exc:  # noqa: BLE001 - an unbuilt or broken install
        raise LlamaCppUnavailable(f"llama_cpp does not import: {exc}") from None
    return llama_cpp.__version__


def _llama_dir(folder: Path) -> Path | None:
    for cand in (folder / "vendor" / "llama.cpp", folder):
        if all((cand / rel).exists() for rel in NEEDED):
            return cand
    return None


def _extract(tarball: Path, dest: Path) -> Path:
    """The llama.cpp files the flow uses from an sdist tarball, into `dest` (an sdist-shaped folder)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        with tarfile.open(tarball) as tar:
            members = []
            for m in tar.getmembers():
                parts = m.name.split("/", 1)
                rest = parts[1] if len(parts) == 2 else ""
                if rest == "PKG-INFO" or (rest.startswith("vendor/llama.cpp/")
                                          and rest[len("vendor/llama.cpp/"):].startswith(EXTRACTED)):
                    m.name = rest
                    members.append(m)
            if not members:
                raise LlamaCppUnavailable(f"{tarball} holds no vendor/llama.cpp")
            try:
                tar.extractall(tmp, members=members, filter="data")
            except TypeError:  # Python without extraction filters
                tar.extractall(tmp, members=members)
        if _llama_dir(tmp) is None:
            raise LlamaCppUnavailable(f"{tarball} lacks one of {', '.join(NEEDED)}")
        if dest.exists():
            shutil.rmtree(dest, ignore_errors=True)
        try:
            os.replace(tmp, dest)
        except OSError:  # another session extracted it meanwhile
            if _llama_dir(dest) is None:
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _sdist_version(root: Path) -> str | None:
    info = root / "PKG-INFO"
    if info.is_file():
        for line in info.read_text(errors="replace").splitlines():
            if line.startswith("Version:"):
                return line.split(":", 1)[1].strip()
    return None


def _tarball_version(tarball: Path) -> str | None:
    """llama_cpp_python-<version>.tar.gz's version, from its name."""
    stem = tarball.name.removesuffix(".tar.gz").removesuffix(".tgz")
    return stem.split("-", 1)[1] if stem.startswith("llama_cpp_python-") and "-" in stem else None


def llama_cpp_source(version: str | None = None) -> Path:
    """vendor/llama.cpp of the pinned llama-cpp-python sdist (see the module docstring for the order)."""
    version = version or pinned_version()
    cache = CACHE_ROOT / f"llama_cpp_python-{version}"
    given = os.environ.get(SDIST_ENV)
    if given:
        path = Path(given).expanduser()
        if path.is_file() and path.name.endswith((".tar.gz", ".tgz")):
            if (v := _tarball_version(path)) not in (None, version):
                raise LlamaCppUnavailable(f"${SDIST_ENV} is llama-cpp-python {v}, installed is {version}")
            found = _llama_dir(_extract(path, cache))
        elif path.is_dir():
            found = _llama_dir(path)
            if found is None:
                raise LlamaCppUnavailable(f"${SDIST_ENV}={path} holds no vendor/llama.cpp with {NEEDED[0]}")
            root = found.parent.parent if found.name == "llama.cpp" else found
            if (v := _sdist_version(root)) not in (None, version):
                raise LlamaCppUnavailable(f"${SDIST_ENV} is llama-cpp-python {v}, installed is {version}")
        else:
            raise LlamaCppUnavailable(f"${SDIST_ENV}={path} is neither a folder nor a .tar.gz")
        assert found is not None
        return found
    if (found := _llama_dir(cache)) is not None:
        return found
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
               f"llama-cpp-python=={version}", "-d", tmp, "-q"]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise LlamaCppUnavailable(f"pip download llama-cpp-python=={version} failed: {exc}") from None
        tarballs = sorted(Path(tmp).glob("llama_cpp_python-*.tar.gz"))
        if proc.returncode != 0 or not tarballs:
            last = (proc.stderr.strip().splitlines() or ["no sdist downloaded"])[-1]
            raise LlamaCppUnavailable(f"pip download llama-cpp-python=={version} failed: {last}")
        found = _llama_dir(_extract(tarballs[0], cache))
    assert found is not None
    return found


# ---- the flow --------------------------------------------------------------------------------------------

@dataclass
class Step:
    argv: list[str]          # as a user would type it (the runner is shown as convert_hf_to_gguf.py)
    seconds: float
    ok: bool


@dataclass
class LlamaCppPair:
    family: str
    model: Path
    mmproj: Path
    workdir: Path
    steps: list[Step] = field(default_factory=list)


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text(encoding="utf-8"))


def _state_dict(folder: Path) -> dict[str, Any]:
    from safetensors.torch import load_file
    tensors: dict[str, Any] = {}
    for shard in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(shard))
    return tensors


def surgery(family: str, folder: Path) -> None:
    """minicpmv-surgery.py's outputs, without the published modeling code (module docstring)."""
    import torch
    from safetensors.torch import save_file

    config = _read_json(folder / "config.json")
    state = _state_dict(folder)
    # Read before added_tokens.json is emptied: a transformers 4.x save of the loaded tokenizer writes its
    # added tokens back into model/added_tokens.json.
    tokenizer_files = {p.name: p.read_bytes() for p in sorted(folder.iterdir())
                       if p.is_file() and p.name not in NOT_TOKENIZER and not p.name.endswith(".safetensors")}

    projector = {k: v.float() for k, v in state.items() if k.startswith("resampler")}
    if "resampler.proj" in projector and "scale_emb" in config:
        projector["resampler.proj"] = projector["resampler.proj"] / config["scale_emb"]
    torch.save(projector, folder / "minicpmv.projector")

    clip = {k.replace("vpm.", ""): v.float() for k, v in state.items() if k.startswith("vpm")}
    if clip:
        torch.save(clip, folder / "minicpmv.clip")
        if (folder / "added_tokens.json").exists():
            (folder / "added_tokens.json").write_text("{}\n")

    out = folder / "model"
    out.mkdir(exist_ok=True)
    llm = {k[len("llm."):]: v.to(torch.bfloat16).contiguous() for k, v in state.items() if k.startswith("llm.")}
    save_file(llm, out / "model.safetensors", metadata={"format": "pt"})
    llm_config = {**config, "architectures": [LLM_CLASS[family]], "auto_map": SURGERY_AUTO_MAP}
    (out / "config.json").write_text(json.dumps(llm_config, indent=2) + "\n")
    generation = {"_from_model_config": True, **{k: config[k] for k in ("bos_token_id", "eos_token_id",
                                                                        "pad_token_id") if k in config},
                  "transformers_version": config.get("transformers_version")}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    for name, data in tokenizer_files.items():
        (out / name).write_bytes(data)


def _env(llama_dir: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(llama_dir / "gguf-py"), *filter(None, [env.get("PYTHONPATH")])])
    env.pop("NO_LOCAL_GGUF", None)
    return env


def _run(cmd: list[str], shown: list[str], cwd: Path, env: dict[str, str], log: Path, steps: list[Step]) -> None:
    start = time.monotonic()
    with open(log, "ab") as out:
        out.write(("$ " + " ".join(shown) + "\n").encode())
        out.flush()
        proc = subprocess.run(cmd, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                              timeout=STEP_TIMEOUT)
    steps.append(Step(shown, time.monotonic() - start, proc.returncode == 0))
    if proc.returncode != 0:
        tail = log.read_text(errors="replace").splitlines()[-25:]
        raise ConversionFailed(f"{' '.join(shown)} exited {proc.returncode}:\n" + "\n".join(tail))


def _convert_hf(llama_dir: Path, family: str, args: list[str], cwd: Path, env: dict[str, str], log: Path,
                steps: list[Step]) -> None:
    cmd = [sys.executable, "-c", RUNNER, str(llama_dir), PRE_TOKENIZER[family] or "", *args]
    _run(cmd, ["python", "convert_hf_to_gguf.py", *args], cwd, env, log, steps)


def _new_gguf(folder: Path, before: set[Path]) -> Path:
    made = sorted(set(folder.glob("*.gguf")) - before)
    if len(made) != 1:
        raise ConversionFailed(f"expected one new GGUF in {folder}, found {[p.name for p in made]}")
    return made[0]


def build_pair(family: str, checkpoint: Path, out_dir: Path, llama_dir: Path | None = None) -> LlamaCppPair:
    """llama.cpp's GGUF pair for `family`'s checkpoint, made in `out_dir` (replaced if present)."""
    if family not in MINICPMV_VERSION and family not in MERGER:
        raise ValueError(f"no llama.cpp flow for {family!r}")
    llama_dir = llama_dir or llama_cpp_source()
    out_dir = Path(out_dir)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    folder = out_dir / Path(checkpoint).name
    shutil.copytree(checkpoint, folder)
    log = out_dir / "llamacpp.log"
    env = _env(llama_dir)
    steps: list[Step] = []

    if family in MERGER:
        before = set(folder.glob("*.gguf"))
        _convert_hf(llama_dir, family, [str(folder), "--outtype", "f16", "--no-mtp"], out_dir, env, log, steps)
        model = _new_gguf(folder, before)
        before = set(folder.glob("*.gguf"))
        _convert_hf(llama_dir, family, [str(folder), "--mmproj", "--outtype", "f16"], out_dir, env, log, steps)
        mmproj = _new_gguf(folder, before)
        return LlamaCppPair(family, model, mmproj, out_dir, steps)

    start = time.monotonic()
    surgery(family, folder)
    steps.append(Step(["python", f"{LEGACY_DIR}/minicpmv-surgery.py", "-m", str(folder), "(emulated)"],
                      time.monotonic() - start, True))

    encoder_args = ["-m", str(folder), "--minicpmv-projector", str(folder / "minicpmv.projector"),
                    "--output-dir", str(folder), "--image-mean", "0.5", "0.5", "0.5",
                    "--image-std", "0.5", "0.5", "0.5", "--minicpmv_version", str(MINICPMV_VERSION[family])]
    _run([sys.executable, str(llama_dir / IMAGE_ENCODER_SCRIPT), *encoder_args],
         ["python", IMAGE_ENCODER_SCRIPT, *encoder_args], out_dir, env, log, steps)
    mmproj = folder / "mmproj-model-f16.gguf"
    if not mmproj.is_file():
        raise ConversionFailed(f"{IMAGE_ENCODER_SCRIPT} wrote no {mmproj}")

    before = set((folder / "model").glob("*.gguf"))
    _convert_hf(llama_dir, family, [str(folder / "model"), "--outtype", "f16"], out_dir, env, log, steps)
    model = _new_gguf(folder / "model", before)
    return LlamaCppPair(family, model, mmproj, out_dir, steps)


# ---- inspection ------------------------------------------------------------------------------------------

_ARRAYS_OMITTED = ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.scores",
                   "tokenizer.ggml.token_type")


def gguf_metadata(path: Path, *, omit_token_arrays: bool = True) -> dict[str, Any]:
    """Key -> value of a GGUF's metadata (gguf.GGUFReader), token / merge / score arrays left out."""
    from gguf import GGUFReader
    reader = GGUFReader(path)
    meta: dict[str, Any] = {}
    for key, fld in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        if omit_token_arrays and key in _ARRAYS_OMITTED:
            meta[key] = f"<array of {len(fld.data)}>"
            continue
        value = fld.contents()
        meta[key] = value
    return meta
