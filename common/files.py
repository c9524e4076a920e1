"""Atomic file writes: the content goes to a hidden `.NAME.partial` beside the target, is fsynced, and is
renamed over the target (then the folder is fsynced), so a reader or a kill sees the old file or the new
one, never half of one; on any failure the partial is removed."""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Callable, Iterator, Union

Content = Union[bytes, Callable[[BinaryIO], object]]


def partial_path(target: Path) -> Path:
    """Where the content of `target` is written before it is renamed into place."""
    return target.with_name(f".{target.name}.partial")


def _fsync(path: Path, flags: int = os.O_RDONLY) -> None:
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_path(target: Path, *, durable: bool = True) -> Iterator[Path]:
    """Yield the partial path for the caller to write (for writers that take a path); when the block ends
    normally it replaces `target`. `durable=False` skips the fsyncs (a cache whose torn entries only miss)."""
    target = Path(target)
    partial = partial_path(target)
    try:
        yield partial
        if durable:
            _fsync(partial)
        os.replace(partial, target)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    if durable:
        _fsync(target.parent)  # the rename itself survives a power cut


def atomic_write(target: Path, content: Content, *, durable: bool = True) -> None:
    """Write `content` (bytes, or a function that writes to the open binary file) to `target` atomically."""
    with atomic_path(target, durable=durable) as partial, open(partial, "wb") as f:
        if callable(content):
            content(f)
        else:
            f.write(content)
