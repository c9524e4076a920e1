"""Benchmark: MiniCPM-V 4.6 at full published size (synthetic weights), Q4_K_M through our runtime in both
downsample modes, beside transformers running the same checkpoint natively on the CPU (float32), in one run.

One 448x448 image, the same prompt layout (the runtime's, which the tests prove equal to the published
processor's) and the same number of new tokens for every engine; each engine runs in its own child process
so its peak RSS is its own. Reported: image encode ms, time to first token (image encode + prefill),
decode tokens/s, peak RSS. JSON and Markdown under bench/results/.

    python bench/minicpmv4_6.py --workdir /tmp/bench46      # builds the checkpoint and converts it if absent
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import child_result, save  # noqa: E402 - bench/report.py
from runtime import QUESTION, bench_image, engine_table, run_ours  # noqa: E402 - bench/runtime.py, the same image and prompt

from minicpmv_edge.common.system import address_space_peak_rss_bytes, default_threads  # noqa: E402

FAMILY = "minicpm-v-4.6"
ENGINES = ("ours 16x", "ours 4x", "transformers 16x", "transformers 4x")


def prepare(workdir: Path) -> tuple[Path, Path]:
    """The full-size checkpoint and its Q4_K_M conversion (both mmproj modes), made once."""
    from minicpmv_edge.convert import convert_checkpoint
    from minicpmv_edge.synthetic import make_checkpoint

    checkpoint, gguf_dir = workdir / "checkpoint", workdir / "q4_k_m"
    if not (checkpoint / "config.json").exists():
        make_checkpoint(FAMILY, checkpoint, size="full")
    for mode in ("16x", "4x"):
        if not _mmprojs(gguf_dir, mode):
            convert_checkpoint(checkpoint, gguf_dir, "q4_k_m", downsample_mode=mode)
    return checkpoint, gguf_dir


def _mmprojs(gguf_dir: Path, mode: str) -> list[Path]:
    """The converter names the 4x mmproj `mmproj-<name>-4x-<TYPE>.gguf` and the 16x one without the mode."""
    return [p for p in gguf_dir.glob("mmproj-*.gguf") if ("-4x-" in p.name) == (mode == "4x")]


def gguf_pair(gguf_dir: Path, mode: str) -> tuple[Path, Path]:
    [model] = [p for p in gguf_dir.glob("*.gguf") if not p.name.startswith("mmproj")]
    [mmproj] = _mmprojs(gguf_dir, mode)
    return model, mmproj


def prompt_ids(gguf_dir: Path, mode: str, pages: list, question: str) -> list[list[int]]:
    """Each page's prompt as the runtime lays it out (the tests prove it equal to the published processor's,
    whose video half needs torchvision), image rows shown as the model's image token."""
    from minicpmv_edge.runtime import load

    model = load(*gguf_pair(gguf_dir, mode))
    try:
        image_token = model.engine.tokenize("<|image_pad|>")[0]
        return [[item if isinstance(item, int) else image_token
                 for item in model.prepare([{"role": "user", "content": [page, question]}])[0]] for page in pages]
    finally:
        model.close()


class TransformersModel:
    """MiniCPM-V 4.6 run natively by transformers on the CPU in float32 (bfloat16 matmuls are slower there)."""

    def __init__(self, checkpoint: Path, mode: str):
        import torch
        from transformers import MiniCPMV4_6ForConditionalGeneration
        from transformers.models.minicpmv4_6.image_processing_pil_minicpmv4_6 import MiniCPMV4_6ImageProcessorPil

        torch.set_num_threads(default_threads())
        self.torch, self.mode = torch, mode
        self.model = MiniCPMV4_6ForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.float32).eval()
        self.images = MiniCPMV4_6ImageProcessorPil.from_pretrained(checkpoint, downsample_mode=mode)

    def generate(self, ids: list[int], image, max_new_tokens: int) -> dict:  # noqa: ANN001 - a PIL image
        from transformers import LogitsProcessor, LogitsProcessorList

        stamps: list[float] = []

        class Clock(LogitsProcessor):
            def __call__(self, input_ids, scores):  # noqa: ANN001, ANN204 - transformers' signature
                stamps.append(time.perf_counter())
                return scores

        torch = self.torch
        started = time.perf_counter()
        with torch.no_grad():
            pixels = self.images(image, return_tensors="pt")
            out = self.model.generate(input_ids=torch.tensor([ids]), pixel_values=pixels["pixel_values"],
                                      target_sizes=pixels["target_sizes"], downsample_mode=self.mode,
                                      max_new_tokens=max_new_tokens, do_sample=False,
                                      logits_processor=LogitsProcessorList([Clock()]))
        return {"time_to_first_token_s": stamps[0] - started, "generated_tokens": out.shape[1] - len(ids),
                "decode_tokens_per_s": (len(stamps) - 1) / (stamps[-1] - stamps[0]) if len(stamps) > 1 else 0.0,
                "seconds": time.perf_counter() - started}

    def encode_ms(self, image) -> float:  # noqa: ANN001 - a PIL image
        started = time.perf_counter()
        with self.torch.no_grad():
            pixels = self.images(image, return_tensors="pt")
            self.model.model.get_image_features(pixels["pixel_values"], pixels["target_sizes"],
                                                downsample_mode=self.mode)
        return (time.perf_counter() - started) * 1000


def run_transformers(checkpoint: Path, gguf_dir: Path, mode: str, max_new_tokens: int) -> dict:
    from PIL import Image

    image = Image.open(io.BytesIO(bench_image()))
    [ids] = prompt_ids(gguf_dir, mode, [image], QUESTION)
    started = time.perf_counter()
    model = TransformersModel(checkpoint, mode)
    loaded = time.perf_counter()
    encode_ms = model.encode_ms(image)
    result = model.generate(ids, image, max_new_tokens)
    del result["seconds"]
    return {"load_s": loaded - started, "image_encode_ms": encode_ms, "prompt_tokens": len(ids), **result}


def child(engine: str, checkpoint: Path, gguf_dir: Path, max_new_tokens: int) -> dict:
    mode = engine.rsplit(" ", 1)[1]
    result = (run_ours(gguf_pair(gguf_dir, mode), max_new_tokens) if engine.startswith("ours")
              else run_transformers(checkpoint, gguf_dir, mode, max_new_tokens))
    result["peak_rss_bytes"] = address_space_peak_rss_bytes()
    return result


def markdown(result: dict) -> str:
    lines = [f"# MiniCPM-V 4.6, full size (synthetic weights): Q4_K_M GGUF ({result['gguf_bytes'] / 1e9:.2f} GB "
             f"with both mmprojs) vs transformers float32 on the CPU; one 448x448 image, "
             f"{result['max_new_tokens']} new tokens", ""]
    lines += engine_table(result["engines"], [
        ("load s", "load_s", ".1f"), ("prompt tokens", "prompt_tokens", "d"),
        ("image encode ms", "image_encode_ms", ",.0f"), ("TTFT s", "time_to_first_token_s", ".2f"),
        ("decode tok/s", "decode_tokens_per_s", ".2f"), ("peak RSS GiB", "peak_rss_gib", ".2f")])
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/minicpmv-bench46"))
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    checkpoint, gguf_dir = args.workdir / "checkpoint", args.workdir / "q4_k_m"
    if args.child:
        print(json.dumps(child(args.child, checkpoint, gguf_dir, args.max_new_tokens)))
        return

    prepare(args.workdir)
    results = {}
    for engine in ENGINES:
        command = [sys.executable, __file__, "--workdir", str(args.workdir), "--child", engine,
                   "--max-new-tokens", str(args.max_new_tokens)]
        results[engine] = child_result(engine, command)
    result = {"max_new_tokens": args.max_new_tokens, "engines": results,
              "gguf_bytes": sum(p.stat().st_size for p in gguf_dir.glob("*.gguf"))}
    save("minicpm-v-4.6-full-q4_k_m", result, markdown)


if __name__ == "__main__":
    main()
