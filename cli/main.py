"""The `minicpmv` command: parse, call the library, print. Bad input ends in one line on stderr and a
non-zero exit, never a traceback."""

from __future__ import annotations

import functools
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


@app.callback()
def _root() -> None:
    """Convert and run MiniCPM-V vision-language models on a CPU with llama.cpp."""


def one_line_errors(command: F) -> F:
    """Turn the library's input errors (and a Ctrl-C) into one line and exit code 1 / 130."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        from minicpmv_edge.convert import ConversionError

        try:
            return command(*args, **kwargs)
        except ConversionError as e:
            console.print(f"[red]error:[/red] {e}", highlight=False, markup=True)
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            console.print("[red]interrupted[/red]")
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
    threads: Optional[int] = typer.Option(None, "--threads", "-t", help="Quantizer threads (default: all cores)"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar or summary"),
) -> None:
    """Convert a MiniCPM-V checkpoint into a language-model GGUF and an mmproj GGUF in one pass."""
    from minicpmv_edge.convert import convert_checkpoint

    columns = (TextColumn("converting"), BarColumn(), TextColumn("{task.percentage:>5.1f}%"),
               TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console, disable=quiet, transient=True) as bar:
        task = bar.add_task("convert", total=None)
        result = convert_checkpoint(source, outdir, preset, n_threads=threads,
                                    progress=lambda done, total: bar.update(task, completed=done, total=total))
    if not quiet:
        console.print(_summary_table(result))
    print(result.llm_path)
    print(result.mmproj_path)


def main() -> None:
    app(prog_name="minicpmv")


if __name__ == "__main__":
    main()
