"""One pass from a published checkpoint to the two GGUF files llama.cpp runs: the language model and the
mmproj. Tensors stream from the memory-mapped shards through ggml's quantizer into the output files; no
intermediate file is written, and both outputs appear only once both are complete."""

from __future__ import annotations

import errno
import os
import time
from collections import Counter
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

from gguf import GGUFWriter

from .checkpoint import Checkpoint, open_checkpoint, resolve_source
from .errors import ConversionError
from minicpmv_edge.common.files import atomic_path
from minicpmv_edge.common.system import default_threads, peak_rss_bytes
from minicpmv_edge.families import Family

from .families import detect_family
from .gguf_out import GgufPlan, check_free_space, value_count, write_gguf
from .llm import plan_llm
from .merger import downsample_mode_of, plan_merger_mmproj
from .mmproj import plan_resampler_mmproj
from .presets import Preset, load_preset

# Called with (values done, values in all) as tensors stream; the CLI draws its progress bar from it.
ProgressCallback = Callable[[int, int], None]


@dataclass
class ConversionResult:
    family: Family
    preset: Preset
    llm_path: Path
    mmproj_path: Path
    tensor_types: dict[str, Counter] = field(default_factory=dict)  # file role -> type name -> count
    bytes_written: int = 0
    seconds: float = 0.0
    peak_rss_bytes: int = 0


def output_paths(outdir: Path, stem: str, preset: Preset, mmproj_variant: str = "") -> tuple[Path, Path]:
    variant = f"-{mmproj_variant}" if mmproj_variant else ""
    return (outdir / f"{stem}-{preset.name.upper()}.gguf",
            outdir / f"mmproj-{stem}{variant}-{preset.mmproj_type.name}.gguf")


def _check_tensor_prefixes(names: Iterable[str], family: Family) -> None:
    """Every published tensor is either converted or knowingly skipped (MiniCPM-o's audio and TTS parts)."""
    known = (family.layout.llm_prefix, *family.layout.vision_prefixes, *family.skip_prefixes)
    unexpected = sorted(name for name in names if not name.startswith(known) and name != family.layout.lm_head)
    if unexpected:
        raise ConversionError(f"{len(unexpected)} tensors belong to no part this converter knows for "
                              f"{family.title}, e.g. {unexpected[0]}")


def _prepare_outdir(outdir: Path) -> None:
    try:
        outdir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConversionError(f"cannot create output folder {outdir}: {e.strerror}") from None
    if not os.access(outdir, os.W_OK):
        raise ConversionError(f"output folder {outdir} is not writable")


def _plan_mmproj(checkpoint: Checkpoint, family: Family, preset: Preset,
                 downsample_mode: str | None) -> tuple[GgufPlan, str]:
    """The projector's plan, and what tells its file apart from other variants of the same model."""
    if family.projector == "minicpmv4_6":
        mode = downsample_mode_of(checkpoint, downsample_mode)
        # The checkpoint's own default keeps the plain name; the other mode's variant can sit beside it.
        default = downsample_mode_of(checkpoint, None)
        return plan_merger_mmproj(checkpoint, family, preset, mode), "" if mode == default else mode
    if downsample_mode is not None:
        raise ConversionError(f"a downsample mode applies to MiniCPM-V 4.6's merger, not to {family.title}")
    return plan_resampler_mmproj(checkpoint, family, preset), ""


def convert_checkpoint(source: str | Path, outdir: str | Path, preset: str = "q4_k_m", *,
                       downsample_mode: str | None = None, n_threads: int | None = None,
                       progress: ProgressCallback | None = None) -> ConversionResult:
    """Convert a MiniCPM-V checkpoint (local folder or hub id) into `outdir`: `<name>-<PRESET>.gguf` and
    `mmproj-<name>-<TYPE>.gguf` (`mmproj-<name>-<MODE>-<TYPE>.gguf` for a merger's downsample mode other than the
    checkpoint's default, e.g. MiniCPM-V 4.6 in 4x).
    Raises ConversionError for bad input; leaves no partial file behind."""
    started = time.perf_counter()
    chosen = load_preset(preset) if isinstance(preset, str) else preset
    folder = resolve_source(str(source))
    checkpoint = open_checkpoint(folder)
    family = detect_family(checkpoint.config)
    _check_tensor_prefixes(checkpoint.tensors, family)
    mmproj_plan, mmproj_variant = _plan_mmproj(checkpoint, family, chosen, downsample_mode)
    plans: list[GgufPlan] = [plan_llm(checkpoint, family, chosen), mmproj_plan]
    for plan in plans:
        # Build each header once in memory first, so a missing config key or a broken tokenizer fails
        # before anything is written.
        plan.metadata(GGUFWriter(None, plan.arch))

    out = Path(outdir).expanduser()
    _prepare_outdir(out)
    # A hub download lives in a snapshot folder named by commit hash: name the files after the repo instead.
    local = Path(str(source)).expanduser().exists()
    finals = output_paths(out, folder.resolve().name if local else str(source).rsplit("/", 1)[-1], chosen,
                          mmproj_variant)
    check_free_space(out, sum(plan.nbytes for plan in plans))

    total = sum(value_count(plan.tensors) for plan in plans)
    done = 0

    def on_block(n_values: int) -> None:
        nonlocal done
        done += n_values
        if progress:
            progress(done, total)

    threads = n_threads or default_threads()
    try:
        # Both files appear only once both are complete: each is written under its partial name and both are
        # renamed as the stack closes; any failure removes every partial.
        with ExitStack() as stack:
            partials = [stack.enter_context(atomic_path(final)) for final in finals]
            for plan, partial in zip(plans, partials):
                write_gguf(plan, partial, threads, on_block)
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise ConversionError(f"ran out of disk space writing {out}") from None
        raise ConversionError(f"cannot write to {out}: {e.strerror or e}") from None
    finally:
        checkpoint.close()

    result = ConversionResult(family, chosen, *finals)
    for role, plan in zip(("llm", "mmproj"), plans):
        result.tensor_types[role] = Counter(t.qtype.name for t in plan.tensors)
    result.bytes_written = sum(f.stat().st_size for f in finals)
    result.seconds = time.perf_counter() - started
    result.peak_rss_bytes = peak_rss_bytes()
    return result
