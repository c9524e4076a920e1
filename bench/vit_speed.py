"""Benchmark: one piece through our ggml vision graph (runtime/video_encoder.py) beside clip.cpp's encode of the
same piece (the runtime's still-image path, runtime/clip_encoder.py), alternating in one process on one GGUF
pair with the same thread count, so both see the same machine load.

Each repetition times both, in alternating order (ABBA), after one warm-up each. Reported: the median seconds
of each, the median of the per-repetition ratios ours / clip.cpp, and our per-frame cost inside a group of
`--group` frames (one graph: the ViT over the frames as a batch, the resampler over all of them), plus the
embeddings' agreement (cosine per token, a still image). JSON and Markdown under bench/results/.

    python bench/vit_speed.py --model-dir /tmp/minicpmv-bench/out-minicpm-v-4.5-full-q4_k_m --label full
    python bench/vit_speed.py --tiny --reps 5          # the demo's tiny model: a smoke run, not a figure
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report import save  # noqa: E402 - bench/report.py

from minicpmv_edge.common.system import default_threads  # noqa: E402


def timed(fn) -> tuple[float, float]:  # noqa: ANN001
    """(wall s, process CPU s) of one call: on a shared machine the CPU seconds, which other processes do not
    inflate, are the steadier figure (with one thread they are the work itself; with more they include ggml's
    spin-waiting at barriers, the same for both paths)."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def piece(width: int, height: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def measure(model_dir: Path, width: int, height: int, reps: int, group: int, n_threads: int) -> dict:
    from minicpmv_edge.runtime import load
    from minicpmv_edge.runtime.pair import resolve_pair
    from minicpmv_edge.runtime.video_encoder import VideoEncoder

    image = piece(width, height)
    frames = [piece(width, height, seed) for seed in range(group)]
    _, mmproj = resolve_pair(model_dir)
    with load(model_dir, n_threads=n_threads) as model, VideoEncoder(mmproj, n_threads) as ours:
        def clip() -> np.ndarray:
            return model.vision.encoder.encode(image)

        def graph() -> np.ndarray:
            return ours.encode_group([image], [-1])

        a, b = clip(), graph()  # warm-up, and the agreement of the two
        cosine = float(((a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))).min())
        clip_s, ours_s = [], []
        for rep in range(reps):
            order = [(clip, clip_s), (graph, ours_s)]
            for fn, out in order if rep % 2 == 0 else order[::-1]:
                out.append(timed(fn))
        ids = list(range(0, 2 * group, 2))
        ours.encode_group(frames, ids)
        group_s = [timed(lambda: ours.encode_group(frames, ids)) for _ in range(max(1, reps // 2))]
    result = {"model_dir": str(model_dir), "piece": f"{width}x{height}", "threads": n_threads, "reps": reps,
              "group_frames": group, "still_image_min_cosine": cosine}
    for k, kind in enumerate(("wall", "cpu")):
        clip_k, ours_k = [t[k] for t in clip_s], [t[k] for t in ours_s]
        ratios = [o / c for o, c in zip(ours_k, clip_k)]
        result[kind] = {"clip_cpp_s": clip_k, "ours_s": ours_k, "ratio_per_rep": ratios,
                        "clip_cpp_median_s": statistics.median(clip_k), "ours_median_s": statistics.median(ours_k),
                        "ratio_median": statistics.median(ratios), "ratio_max": max(ratios),
                        "ours_group_per_frame_median_s": statistics.median(t[k] for t in group_s) / group}
    return result


def markdown(result: dict) -> str:
    wall, cpu = result["wall"], result["cpu"]
    return "\n".join([
        f"# ViT + resampler, one {result['piece']} piece: our ggml graph vs clip.cpp ({result['threads']} threads, "
        f"{result['reps']} alternating repetitions)", "",
        "| path | median wall s | median CPU s |", "|---|---|---|",
        f"| clip.cpp `clip_image_encode` | {wall['clip_cpp_median_s']:.3f} | {cpu['clip_cpp_median_s']:.3f} |",
        f"| ours, one frame (still image) | {wall['ours_median_s']:.3f} | {cpu['ours_median_s']:.3f} |",
        f"| ours, per frame in a group of {result['group_frames']} | {wall['ours_group_per_frame_median_s']:.3f} "
        f"| {cpu['ours_group_per_frame_median_s']:.3f} |", "",
        f"ratio ours / clip.cpp (median of paired repetitions, worst): wall {wall['ratio_median']:.3f} "
        f"({wall['ratio_max']:.3f}), CPU {cpu['ratio_median']:.3f} ({cpu['ratio_max']:.3f}); still-image "
        f"embeddings min cosine per token {result['still_image_min_cosine']:.7f}", ""])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", type=Path, help="a GGUF pair of MiniCPM-V 4.5 (or another resampler family)")
    parser.add_argument("--tiny", action="store_true", help="the demo's tiny model (a smoke run)")
    parser.add_argument("--label", default=None)
    parser.add_argument("--size", default="448x448", help="piece WxH (multiples of 14)")
    parser.add_argument("--reps", type=int, default=6)
    parser.add_argument("--group", type=int, default=3, help="frames per group for the per-frame figure")
    parser.add_argument("--threads", type=int, default=default_threads())
    args = parser.parse_args()
    if args.tiny:
        from minicpmv_edge.cli.demo import prepared_model

        args.model_dir, args.label = prepared_model(), args.label or "tiny"
    if args.model_dir is None:
        parser.error("give --model-dir or --tiny")
    width, height = (int(v) for v in args.size.split("x"))
    result = measure(args.model_dir, width, height, args.reps, args.group, args.threads)
    save(f"vit-speed-{args.label or args.model_dir.name}", result, markdown)


if __name__ == "__main__":
    main()
