"""Benchmark: a synthetic 20 s clip, MiniCPM-V 4.5 at the model card's video settings (fps 5, packing 3: three
frames per 64-token 3D-resampler block) beside llama.cpp's way (the same frames as separate images, 64 tokens
each: our runtime without temporal ids, and `llama-mtmd-cli` where the lead's build exists), and MiniCPM-V 4.6's
video path (one frame per second, and stack_frames 5 for the same 5 samples per second), all in one run.

Every engine runs in its own child process (peak RSS is its own). Reported per engine: frames, 3D groups,
image tokens, video decode s (PyAV + sampling), encode s, prefill s, time to first token (decode + encode +
prefill, from the call), peak RSS. JSON and Markdown under bench/results/.

    python bench/video.py --size full --workdir /tmp/bench-video     # full published sizes, Q4_K_M
    python bench/video.py --size tiny                                 # smoke run on tiny checkpoints
"""

from __future__ import annotations

import argparse
import json
import re
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pairs import gguf_dir  # noqa: E402 - bench/pairs.py
from report import child_result, save  # noqa: E402 - bench/report.py
from runtime import engine_table  # noqa: E402 - bench/runtime.py

from minicpmv_edge.common.system import address_space_peak_rss_bytes, rusage_peak_bytes  # noqa: E402

QUESTION = "Describe the video."
CLIP_SECONDS, CLIP_FPS, CLIP_SIZE = 20, 25, (448, 256)  # 448x256 fits one slice: 64 tokens per image everywhere
FPS, PACKING = 5, 3  # the model card's video example
MTMD_CLI = Path.home() / ".cache/minicpmv-edge/llama-build/bin/llama-mtmd-cli"
# engine -> (family, how the video reaches the model)
ENGINES = {
    "4.5 ours packing 3": ("minicpm-v-4.5", "packed"),
    "4.5 ours frames as images": ("minicpm-v-4.5", "images"),
    "4.5 llama-mtmd-cli frames as images": ("minicpm-v-4.5", "mtmd"),
    "4.6 ours 1 fps": ("minicpm-v-4.6", "per-second"),
    "4.6 ours stack_frames 5": ("minicpm-v-4.6", "stacked"),
}


def write_clip(path: Path) -> Path:
    """A moving colour gradient with a bright square crossing it, MPEG-4 at CLIP_FPS."""
    import av

    width, height = CLIP_SIZE
    y, x = np.mgrid[0:height, 0:width]
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=CLIP_FPS)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i in range(CLIP_SECONDS * CLIP_FPS):
            pixels = np.stack([(x + 3 * i) % 256, (y + 2 * i) % 256, np.full_like(x, (5 * i) % 256)], -1)
            left = (7 * i) % (width - 64)
            pixels[96:160, left:left + 64] = 255
            container.mux(stream.encode(av.VideoFrame.from_ndarray(pixels.astype(np.uint8), format="rgb24")))
        container.mux(stream.encode())
    return path


def prepare(workdir: Path, size: str) -> dict[str, Path]:
    """The families' Q4_K_M conversions (bench/pairs.py) and the clip."""
    folders = {family: gguf_dir(family, size) for family in sorted({family for family, _ in ENGINES.values()})}
    if not (workdir / "clip.mp4").exists():
        write_clip(workdir / "clip.mp4")
    return folders


def sampled(clip: Path, how: str):  # noqa: ANN201 - (SampledVideo, seconds)
    from minicpmv_edge.runtime.video import Video, sample

    video = {"packed": Video(clip, fps=FPS, packing=PACKING), "images": Video(clip, fps=FPS, packing=PACKING),
             "mtmd": Video(clip, fps=FPS, packing=PACKING), "per-second": Video(clip),
             "stacked": Video(clip, stack_frames=FPS)}[how]
    started = time.perf_counter()
    result = sample(video, "temporal" if how in ("packed", "images", "mtmd") else "frames")
    return video, result, time.perf_counter() - started


def run_ours(gguf_dir: Path, clip: Path, how: str, max_new_tokens: int) -> dict:
    from minicpmv_edge.runtime import Sampling, load

    video, frames, decode_s = sampled(clip, how)
    if how == "images":  # llama.cpp's way: each frame a still image (clip.cpp), no temporal ids
        content, options = [*frames.frames, QUESTION], {"max_slice_nums": 1, "use_image_id": False}
    else:
        content, options, decode_s = [video, QUESTION], {}, None  # decoded inside the call; timed separately
    msgs = [{"role": "user", "content": content}]
    model = load(gguf_dir, n_ctx=4096)
    try:
        started = time.perf_counter()
        first = last = None
        for record in model.stream_generate(msgs, max_new_tokens=max_new_tokens, sampling=Sampling(0.0), **options):
            first = first or (record, time.perf_counter() - started)
            last = record
        items, _ = model.prepare(msgs, **options)  # embeddings are cached now: only the layout is redone
    finally:
        model.close()
    record, ttft = first
    if decode_s is None:
        decode_s = sampled(clip, how)[2]
    else:
        ttft += decode_s
    prefill_s = record.prompt_tokens / record.prefill_tokens_per_s
    return {"frames": len(frames.frames), "groups": len(frames.temporal_ids or []) if how == "packed" else 0,
            "image_tokens": sum(1 for item in items if not isinstance(item, int)),
            "prompt_tokens": record.prompt_tokens, "video_decode_s": decode_s,
            "encode_s": record.image_encode_ms / 1000, "prefill_s": prefill_s, "time_to_first_token_s": ttft,
            "decode_tokens_per_s": last.decode_tokens_per_s, "peak_rss_bytes": address_space_peak_rss_bytes()}


MTMD_ENCODED = re.compile(r"batch encoding done in\s+([\d.]+) ms")
MTMD_FIRST_ENCODE = re.compile(r"^(\d+)\.(\d+)\.(\d+)\.(\d+) I encoding mtmd batch", re.M)  # log clock m.ss.ms.us


def run_mtmd(gguf_dir: Path, clip: Path, workdir: Path) -> dict:
    """llama-mtmd-cli with the same frames as separate images (448x256 fits one slice: 64 tokens each), one
    new token. It logs each image's encode time and a clock from its start; TTFT is measured from the first
    image encode (after both models loaded) to its exit after the first token, so prefill = TTFT - encode."""
    if not MTMD_CLI.exists():
        return {"skipped": f"{MTMD_CLI} not built"}
    _, frames, decode_s = sampled(clip, "mtmd")
    frame_dir = workdir / "frames"
    frame_dir.mkdir(exist_ok=True)
    paths = []
    for index, frame in enumerate(frames.frames):
        paths.append(frame_dir / f"{index:04d}.png")
        frame.save(paths[-1])
    [model] = [p for p in gguf_dir.glob("*.gguf") if not p.name.startswith("mmproj")]
    [mmproj] = list(gguf_dir.glob("mmproj-*.gguf"))
    # -nr: no weight repacking (the pinned build's AMX repacking crashes, as the runtime's Engine avoids too)
    command = [str(MTMD_CLI), "-m", str(model), "--mmproj", str(mmproj), "-p", QUESTION, "-n", "1", "--temp", "0",
               "-c", "16384", "--no-warmup", "-nr", "--image", ",".join(map(str, paths))]
    started = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True)
    wall = time.perf_counter() - started
    log = proc.stdout + proc.stderr
    first = MTMD_FIRST_ENCODE.search(log)
    if proc.returncode or first is None:
        return {"skipped": f"llama-mtmd-cli exit {proc.returncode}: {log.strip().splitlines()[-1:]}"}
    minutes, secs, ms, us = (int(g) for g in first.groups())
    ttft = wall - (60 * minutes + secs + ms / 1e3 + us / 1e6)
    encode_s = sum(float(v) for v in MTMD_ENCODED.findall(log)) / 1000
    return {"frames": len(frames.frames), "groups": 0, "image_tokens": 64 * len(frames.frames),
            "video_decode_s": decode_s, "encode_s": encode_s, "prefill_s": ttft - encode_s,
            "time_to_first_token_s": decode_s + ttft,
            "peak_rss_bytes": rusage_peak_bytes(resource.getrusage(resource.RUSAGE_CHILDREN))}


def child(engine: str, folders: dict[str, Path], workdir: Path, max_new_tokens: int) -> dict:
    family, how = ENGINES[engine]
    clip = workdir / "clip.mp4"
    if how == "mtmd":
        return run_mtmd(folders[family], clip, workdir)
    return run_ours(folders[family], clip, how, max_new_tokens)


def markdown(result: dict) -> str:
    lines = [f"# Video: a {CLIP_SECONDS} s {CLIP_SIZE[0]}x{CLIP_SIZE[1]} synthetic clip, {result['size']} size "
             f"(synthetic weights), Q4_K_M; 4.5 at fps {FPS}, packing {PACKING}; {result['max_new_tokens']} new "
             "tokens", ""]
    engines = {name: row for name, row in result["engines"].items() if "skipped" not in row}
    lines += engine_table(engines, [
        ("frames", "frames", "d"), ("3D groups", "groups", "d"), ("image tokens", "image_tokens", ",d"),
        ("video decode s", "video_decode_s", ".2f"), ("encode s", "encode_s", ".2f"),
        ("prefill s", "prefill_s", ".2f"), ("TTFT s", "time_to_first_token_s", ".2f"),
        ("peak RSS GiB", "peak_rss_gib", ".2f")])
    lines += [f"\n{name}: skipped ({row['skipped']})" for name, row in result["engines"].items() if "skipped" in row]
    packed, baseline = engines.get("4.5 ours packing 3"), engines.get("4.5 ours frames as images")
    if packed and baseline:
        lines.append(f"\n4.5 packing {PACKING} vs frames as images (ours): image tokens "
                     f"{packed['image_tokens'] / baseline['image_tokens']:.2f}x, prefill "
                     f"{packed['prefill_s'] / baseline['prefill_s']:.2f}x, TTFT "
                     f"{packed['time_to_first_token_s'] / baseline['time_to_first_token_s']:.2f}x")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/minicpmv-bench-video"))
    parser.add_argument("--size", choices=("tiny", "full"), default="full")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--engines", default=",".join(ENGINES), help="comma-separated subset of: "
                        + ", ".join(ENGINES))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    folders = prepare(args.workdir, args.size)
    if args.child:
        print(json.dumps(child(args.child, folders, args.workdir, args.max_new_tokens)))
        return
    results = {}
    for engine in args.engines.split(","):
        command = [sys.executable, __file__, "--workdir", str(args.workdir), "--size", args.size, "--child", engine,
                   "--max-new-tokens", str(args.max_new_tokens)]
        results[engine] = child_result(engine, command)
    save(f"video-{args.size}-q4_k_m", {"size": args.size, "max_new_tokens": args.max_new_tokens, "engines": results},
         markdown)


if __name__ == "__main__":
    main()
