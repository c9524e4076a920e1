"""The `minicpmv` command: parse, call the library, print. Bad input ends in one line on stderr and a
non-zero exit, never a traceback."""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path
from typing import Callable, Optional, TypeVar

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Convert and run MiniCPM-V vision-language models on a CPU with llama.cpp.")
console = Console(stderr=True)
F = TypeVar("F", bound=Callable[..., object])
# -t / --threads means the same in every command that runs llama.cpp or the quantizer.
_THREADS = typer.Option(None, "--threads", "-t", min=1, help="CPU threads (default: every core this process may use)")
_SMALL_IMAGE_UPSIZE = typer.Option(
    None, "--small-image-upsize", help="How images and slices up to 448x448 are sized: always, never or adaptive "
    "(MiniCPM-OCR; adaptive needs the ocr extra; default: the model's published setting)")


@app.callback()
def _root() -> None:
    """Convert and run MiniCPM-V vision-language models on a CPU with llama.cpp."""


def one_line_errors(command: F) -> F:
    """Turn the library's input errors (and a Ctrl-C) into one line and exit code 1 / 130."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        from minicpmv_edge.convert import ConversionError
        from minicpmv_edge.runtime import ChatInputError, EngineError, ImageInputError, VideoInputError, VisionError
        from minicpmv_edge.runtime.ocr import OcrInputError

        try:
            return command(*args, **kwargs)
        except (ConversionError, EngineError, VisionError, ImageInputError, OcrInputError, ChatInputError,
                VideoInputError) as e:
            print("error: " + " ".join(str(e).split()), file=sys.stderr)
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            raise typer.Exit(130) from None

    return wrapper  # type: ignore[return-value]


def _summary_table(result) -> Table:  # noqa: ANN001 - ConversionResult, imported lazily
    table = Table(title=f"{result.family.title} -> {result.preset.name}", show_header=True)
    table.add_column("file")
    table.add_column("tensors", justify="right")
    table.add_column("types")
    table.add_column("size", justify="right")
    for role, path in (("llm", result.llm_path), ("mmproj", result.mmproj_path)):
        types = result.tensor_types[role]
        table.add_row(path.name, str(sum(types.values())),
                      ", ".join(f"{name} x{count}" for name, count in sorted(types.items())),
                      f"{path.stat().st_size / 2**20:,.1f} MiB")
    table.caption = (f"{result.seconds:.1f} s, peak RSS {result.peak_rss_bytes / 2**20:,.0f} MiB, "
                     f"{result.bytes_written / 2**20:,.1f} MiB written")
    return table


@app.command()
@one_line_errors
def convert(
    source: str = typer.Argument(..., help="Checkpoint folder, or a hub id such as openbmb/MiniCPM-V-4_5"),
    outdir: Path = typer.Option(..., "--outdir", "-o", help="Folder for the two GGUF files"),
    preset: str = typer.Option("q4_k_m", "--preset", "-p", help="Quantization preset (quant_presets/)"),
    threads: Optional[int] = _THREADS,
    downsample_mode: Optional[str] = typer.Option(
        None, "--downsample-mode", help="MiniCPM-V 4.6 only: 16x (published default) or 4x (4x more image tokens)"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar or summary"),
) -> None:
    """Convert a MiniCPM-V checkpoint into a language-model GGUF and an mmproj GGUF in one pass."""
    from minicpmv_edge.convert import convert_checkpoint

    columns = (TextColumn("converting"), BarColumn(), TextColumn("{task.percentage:>5.1f}%"),
               TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console, disable=quiet, transient=True) as bar:
        task = bar.add_task("convert", total=None)
        result = convert_checkpoint(source, outdir, preset, downsample_mode=downsample_mode, n_threads=threads,
                                    progress=lambda done, total: bar.update(task, completed=done, total=total))
    if not quiet:
        console.print(_summary_table(result))
    print(result.llm_path)
    print(result.mmproj_path)


def _load(model: list[str], **options: object):  # noqa: ANN202 - runtime.Model, imported lazily
    from minicpmv_edge.runtime import load

    return load(*model, **options)


def _model_and_rest(args: list[str], what: str) -> tuple[list[str], list[str]]:
    """MODEL (one argument, or two .gguf files) and the arguments after it, the same for every command."""
    from minicpmv_edge.runtime.pair import split_model_arguments

    model, rest = split_model_arguments(args)
    if not model:
        raise typer.BadParameter(f"give MODEL then {what}", param_hint="MODEL")
    return model, rest


def _timings_line(record) -> str:  # noqa: ANN001 - runtime.GenerationResponse
    return (f"image encode {record.image_encode_ms:,.0f} ms | prompt {record.prompt_tokens} tokens at "
            f"{record.prefill_tokens_per_s:,.1f} tok/s | {record.generation_tokens} tokens at "
            f"{record.decode_tokens_per_s:,.1f} tok/s | peak RSS {record.peak_rss_mb:,.0f} MiB")


def _stream(records, as_json: bool) -> None:  # noqa: ANN001 - iterator of GenerationResponse
    pieces, last = [], None
    for record in records:
        last = record
        pieces.append(record.text)
        if not as_json:
            print(record.text, end="", flush=True)
    if as_json:
        timings = {k: v for k, v in vars(last).items() if k not in ("text", "token")} if last else {}
        print(json.dumps({"answer": "".join(pieces), "timings": timings}, ensure_ascii=False))
    else:
        print()
        if last:
            console.print(_timings_line(last), style="dim")


@app.command()
@one_line_errors
def demo(max_new_tokens: int = typer.Option(24, "--max-new-tokens", "-n", min=1, help="Tokens to generate")) -> None:
    """Build (once) a tiny synthetic MiniCPM-V 4.5, convert it, and ask it about a picture."""
    from .demo import DEMO_QUESTION, cache_root, run_demo

    console.print(f"[bold]minicpmv demo[/bold]: tiny synthetic MiniCPM-V 4.5 (cached in {cache_root()})")
    console.print("[yellow]The weights are random, so the answer's words are meaningless; the demo shows the "
                  "path (checkpoint -> GGUF -> vision tower -> llama.cpp) and its timings.[/yellow]")
    console.print(f"Q: {DEMO_QUESTION}")
    print("A: ", end="", flush=True)
    _stream(run_demo(max_new_tokens), as_json=False)


@app.command()
@one_line_errors
def ask(
    args: list[str] = typer.Argument(..., metavar="MODEL QUESTION",
                                     help="MODEL (folder, or model GGUF + mmproj GGUF) then the question"),
    image: list[Path] = typer.Option([], "--image", "-i", help="An image (repeat for several)"),
    video: Optional[Path] = typer.Option(None, "--video", help="A video (needs the video extra: PyAV)"),
    fps: Optional[float] = typer.Option(None, "--fps", min=0.01, help="Video frames sampled per second "
                                        "(MiniCPM-V 4.5 / o-4.5; default 5, the model card's)"),
    packing: Optional[int] = typer.Option(None, "--packing", min=1, max=6, help="Video frames per 64-token "
                                          "block (MiniCPM-V 4.5 / o-4.5; default: as the model card decides)"),
    max_new_tokens: int = typer.Option(512, "--max-new-tokens", "-n", min=1),
    temperature: float = typer.Option(0.0, "--temperature", min=0.0, help="0 for greedy decoding"),
    threads: Optional[int] = _THREADS,
    think: bool = typer.Option(False, "--think", help="Thinking mode (Qwen3-based families)"),
    max_slice_nums: Optional[int] = typer.Option(None, "--max-slice-nums", min=1, help="Slices per image "
                                                 "(default: the family's published setting)"),
    small_image_upsize: Optional[str] = _SMALL_IMAGE_UPSIZE,
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object with answer and timings"),
) -> None:
    """Ask one question about images or a video; the answer streams to stdout."""
    from minicpmv_edge.runtime import Sampling, Video

    model_args, question = _model_and_rest(args, "one question")
    if len(question) != 1:
        raise typer.BadParameter("one question after MODEL (quote it)", param_hint="MODEL QUESTION")
    if video is None and (fps is not None or packing is not None):
        raise typer.BadParameter("--fps and --packing go with --video", param_hint="--fps/--packing")
    clip = [Video(video, fps=fps, packing=packing)] if video is not None else []
    model = _load(model_args, n_threads=threads)
    try:
        msgs = [{"role": "user", "content": [*image, *clip, question[0]]}]
        _stream(model.stream_generate(msgs, max_new_tokens=max_new_tokens, enable_thinking=think,
                                      max_slice_nums=max_slice_nums, sampling=Sampling(temperature=temperature),
                                      small_image_upsize=small_image_upsize),
                as_json)
    finally:
        model.close()


@app.command()
@one_line_errors
def chat(
    model_paths: list[str] = typer.Argument(..., metavar="MODEL"),
    max_new_tokens: int = typer.Option(512, "--max-new-tokens", "-n", min=1),
    threads: Optional[int] = _THREADS,
) -> None:
    """Interactive chat. /image PATH attaches an image, /reset clears, /think on|off, /quit exits."""
    from minicpmv_edge.runtime import ImageInputError
    from minicpmv_edge.runtime.images import load_image

    model_args, extra = _model_and_rest(model_paths, "nothing else")
    if extra:
        raise typer.BadParameter(f"nothing follows MODEL, got {' '.join(extra)}", param_hint="MODEL")
    model = _load(model_args, n_threads=threads)
    history: list[dict] = []
    pending: list = []
    think = False
    try:
        while True:
            try:
                line = input("> ").strip()
            except EOFError:
                break
            if line in ("/quit", "/exit"):
                break
            if line == "/reset":
                history, pending = [], []
                continue
            if line.startswith("/think"):
                think = line.endswith("on")
                console.print(f"thinking {'on' if think else 'off'}")
                continue
            if line.startswith("/image"):
                try:
                    pending.append(load_image(line[len("/image"):].strip()))
                    console.print(f"{len(pending)} image(s) attached")
                except ImageInputError as e:
                    console.print(f"[red]error:[/red] {e}")
                continue
            if not line:
                continue
            history.append({"role": "user", "content": [*pending, line]})
            pending = []
            pieces = []
            for record in model.stream_generate(history, max_new_tokens=max_new_tokens, enable_thinking=think):
                pieces.append(record.text)
                print(record.text, end="", flush=True)
            print()
            history.append({"role": "assistant", "content": "".join(pieces)})
    finally:
        model.close()


@app.command()
@one_line_errors
def serve(
    model_paths: list[str] = typer.Argument(..., metavar="MODEL"),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on (0.0.0.0 opens it to the network)"),
    port: int = typer.Option(8000, "--port", min=0, max=65535),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="MINICPMV_API_KEY",
                                          help="Require Authorization: Bearer KEY on /v1/*"),
    threads: Optional[int] = _THREADS,
    parallel: int = typer.Option(2, "--parallel", min=1, help="Requests generated together (each holds "
                                 "--context positions of KV cache)"),
    context: int = typer.Option(4096, "--context", min=16, help="Prompt + max_tokens limit per request "
                                "(capped by the model's training context)"),
    max_queue: int = typer.Option(8, "--max-queue", min=1, help="Requests that may wait; beyond them 503"),
    max_body_mb: float = typer.Option(32.0, "--max-body-mb", min=0.001, help="Request body limit (413 beyond)"),
    max_image_mp: float = typer.Option(20.0, "--max-image-megapixels", min=0.001, help="Pixels per image limit"),
    default_max_tokens: int = typer.Option(1024, "--default-max-tokens", min=1,
                                           help="max_tokens of requests that name none"),
    allow_remote_images: bool = typer.Option(False, "--allow-remote-images",
                                             help="Let image_url be http(s) URLs, fetched by the server"),
    local_images: Optional[Path] = typer.Option(None, "--local-images", file_okay=False, exists=True,
                                                help="Let image_url be file paths inside this folder"),
    model_id: Optional[str] = typer.Option(None, "--model-id", help="The name /v1/models reports"),
) -> None:
    """An OpenAI-compatible server: POST /v1/chat/completions (streaming too), GET /v1/models, GET /health."""
    try:
        from minicpmv_edge.server import ServerSettings, serve as run_server
    except ImportError as e:
        print(f"error: minicpmv serve needs the server extra: pip install 'minicpmv-edge[server]' ({e})",
              file=sys.stderr)
        raise typer.Exit(1) from None

    model_args, extra = _model_and_rest(model_paths, "nothing else")
    if extra:
        raise typer.BadParameter(f"nothing follows MODEL, got {' '.join(extra)}", param_hint="MODEL")
    settings = ServerSettings(host=host, port=port, api_key=api_key or None, model_id=model_id,
                              max_body_bytes=int(max_body_mb * 2**20), max_image_pixels=int(max_image_mp * 1e6),
                              parallel=parallel, max_queue=max_queue, context=context,
                              default_max_tokens=default_max_tokens,
                              allow_remote_images=allow_remote_images, local_image_dir=local_images)
    model = _load(model_args, n_threads=threads)
    try:
        console.print(f"serving {model_args[0]} at http://{host}:{port}/v1 (Ctrl-C stops)", highlight=False,
                      soft_wrap=True)
        run_server(model, settings)
    finally:
        model.close()


def _ocr_mode(mode: str) -> str:
    from minicpmv_edge.runtime.ocr import PROMPTS

    if mode not in PROMPTS:
        raise typer.BadParameter(f"one of {', '.join(PROMPTS)}, not {mode!r}")
    return mode


@app.command()
@one_line_errors
def ocr(
    args: list[str] = typer.Argument(..., metavar="MODEL INPUTS...", help="MODEL (folder, or model GGUF + mmproj "
                                     "GGUF) then inputs: images, folders, globs, PDFs, or - for paths on stdin"),
    output: Path = typer.Option(..., "--output", "-o", help="JSONL file of page records (appended, resumable)"),
    text_dir: Optional[Path] = typer.Option(None, "--text-dir", help="Also write a .txt/.md file per page here"),
    mode: str = typer.Option("text", "--mode", callback=_ocr_mode, help="text or markdown"),
    prompt: Optional[str] = typer.Option(None, "--prompt", help="A custom instruction instead of the mode's"),
    include: list[str] = typer.Option(["*"], "--include", help="Glob for files inside folders (repeatable)"),
    exclude: list[str] = typer.Option([], "--exclude", help="Glob of files to skip (repeatable)"),
    pages: Optional[str] = typer.Option(None, "--pages", help="PDF page ranges, e.g. 1-3,7"),
    dpi: int = typer.Option(150, "--dpi", min=1, help="PDF rendering resolution"),
    max_slice_nums: Optional[int] = typer.Option(None, "--max-slice-nums", min=1,
                                                 help="Slices per page (dense pages: more)"),
    small_image_upsize: Optional[str] = _SMALL_IMAGE_UPSIZE,
    max_new_tokens: int = typer.Option(1024, "--max-new-tokens", "-n", min=1),
    threads: Optional[int] = _THREADS,
    retry_failed: bool = typer.Option(False, "--retry-failed", help="Process pages that failed before again"),
    cache_dir: Optional[Path] = typer.Option(None, "--embedding-cache", help="Keep image embeddings here between "
                                             "runs (reruns with another prompt skip the vision tower)"),
    cache_gb: float = typer.Option(2.0, "--embedding-cache-gb", min=0, help="Size bound of the embedding cache"),
    memory_mb: int = typer.Option(256, "--embedding-memory-mb", min=0,
                                  help="Image embeddings kept in memory beyond the current page's"),
    ray_address: Optional[str] = typer.Option(
        None, "--ray", metavar="ADDRESS", help="OCR on a Ray cluster (needs the ray extra): auto (the cluster "
        "`ray start` joined this machine to), HOST:PORT of its head, or local (a private instance here); "
        "--threads is then per worker"),
    workers: Optional[int] = typer.Option(None, "--workers", min=1, help="With --ray: workers, each holding the "
                                          "model (default: the cluster's CPUs / --threads)"),
    parallel: Optional[int] = typer.Option(None, "--parallel", min=1, help="Pages OCRed together as sequences "
                                           "of one context (default: ocr.DEFAULT_PARALLEL)"),
    ignore_eos: bool = typer.Option(False, "--ignore-eos", help="Generate --max-new-tokens on every page "
                                    "(benchmarks)"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar"),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as one JSON object"),
) -> None:
    """OCR pages with one model load; reruns skip finished pages, and each page is written exactly once."""
    import contextlib

    from minicpmv_edge.runtime.ocr import DEFAULT_PARALLEL, OcrOptions, run_batch

    model_args, inputs = _model_and_rest(args, "the inputs")
    if not inputs:
        raise typer.BadParameter("no inputs after MODEL", param_hint="MODEL INPUTS...")
    if "-" in inputs:
        inputs = [i for i in inputs if i != "-"] + [line.strip() for line in sys.stdin if line.strip()]
    if workers is not None and ray_address is None:
        raise typer.BadParameter("--workers goes with --ray", param_hint="--workers")
    if parallel is not None and ray_address is not None:
        raise typer.BadParameter("--parallel is for a model in this process; --ray has --workers", param_hint="--parallel")
    pool = None
    if ray_address is not None:
        from minicpmv_edge.runtime.ray_ocr import RayPool

        pool = RayPool(model_args, address=ray_address, workers=workers, threads=threads or 1,
                       embedding_memory_bytes=memory_mb << 20,
                       on_message=lambda line: console.print(line, highlight=False, markup=False, soft_wrap=True))

    def reconciled(report) -> None:  # noqa: ANN001 - jobstore.ReconcileReport
        for count, message in [(report.restored, "restored {} record{} missing from {}"),
                               (report.replaced, "replaced {} stale or repeated record{} in {} with the job store's"),
                               (report.foreign, "kept {} line{} of {} that this job did not write")]:
            if count:
                console.print(message.format(count, "" if count == 1 else "s", output.name),
                              highlight=False, markup=False, soft_wrap=True)

    def page_done(result, so_far) -> None:  # noqa: ANN001 - ocr.PageResult, ocr.Summary
        if result.status == "failed":
            console.print(f"[red]failed[/red] {result.ref.label}: {result.record['error']}", highlight=False)
        bar.update(task, advance=1, rate=f"{so_far.pages_per_min:.1f} pages/min")

    columns = (TextColumn("ocr"), BarColumn(), TextColumn("{task.completed}/{task.total} pages"),
               TextColumn("{task.fields[rate]}"), TimeRemainingColumn())
    with pool or contextlib.nullcontext(), Progress(*columns, console=console, disable=quiet or as_json) as bar:
        task = bar.add_task("ocr", total=None, rate="", visible=False)
        summary = run_batch(
            pool or model_args, inputs, output,
            OcrOptions(mode=mode, prompt=prompt, max_new_tokens=max_new_tokens, max_slice_nums=max_slice_nums,
                       dpi=dpi, small_image_upsize=small_image_upsize, ignore_eos=ignore_eos),
            include=include, exclude=exclude, pages=pages, retry_failed=retry_failed, text_dir=text_dir,
            embedding_cache=cache_dir, embedding_cache_bytes=int(cache_gb * 2**30),
            embedding_memory_bytes=memory_mb << 20, n_threads=threads, parallel=parallel or DEFAULT_PARALLEL,
            on_start=lambda total: bar.update(task, total=total, visible=True), on_page=page_done,
            on_reconcile=reconciled)
    if as_json:
        print(json.dumps(summary.as_dict()))
    elif not quiet:
        console.print(f"done {summary.done}, skipped {summary.skipped}, failed {summary.failed}, "
                      f"{summary.pages_per_min} pages/min -> {output}")
    if summary.failed:
        raise typer.Exit(1)


@app.command()
@one_line_errors
def info(path: Path = typer.Argument(..., help="A GGUF file")) -> None:
    """Family, tensor types, sizes and metadata of a GGUF file."""
    from minicpmv_edge.runtime.info import describe_gguf

    described = describe_gguf(path)
    table = Table(title=f"{path.name}: {described['role']} ({described['architecture']})", show_header=False)
    for key in ("family", "tensors", "parameters", "tensor_types", "bytes"):
        table.add_row(key, str(described[key]))
    for key, value in described["metadata"].items():
        table.add_row(key, str(value))
    Console().print(table)


def main() -> None:
    app(prog_name="minicpmv")


if __name__ == "__main__":
    main()
