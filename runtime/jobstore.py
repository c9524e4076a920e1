"""A resumable batch job: one SQLite row per page, and a JSONL file that receives each page's record
exactly once, however the process was stopped and whatever was done to the JSONL between runs.

A record is committed to the store first (status done/failed, emitted = 0), then appended to the JSONL and
fsynced, then marked emitted. The store is the truth: on every start, `reconcile` compares what the JSONL
really holds with every finished row. It cuts a half-written last line (a kill during an append), appends
the records the JSONL lacks (an interrupted append, or a file truncated, deleted or moved away), and
replaces a record whose content differs from the store's (an older copy restored) or that appears twice.
A line the store does not know (another job's record, notes, a line that is not JSON) belongs to the user:
it stays where it is, byte for byte. So every key of the job appears in the JSONL once."""

from __future__ import annotations

import json
import os
import sqlite3
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

from minicpmv_edge.common.files import atomic_write

_SCHEMA = """
CREATE TABLE IF NOT EXISTS pages (
    key TEXT PRIMARY KEY,
    source TEXT NOT NULL,
    page INTEGER NOT NULL,
    status TEXT NOT NULL,          -- done | failed
    record TEXT NOT NULL,          -- the JSONL line, as JSON
    emitted INTEGER NOT NULL DEFAULT 0,
    updated REAL NOT NULL
)
"""


class JobStoreError(OSError):
    """The job store or its JSONL cannot be read or written (a folder, no permission, a full disk)."""


@dataclass(frozen=True)
class ReconcileReport:
    """What `reconcile` had to fix in the JSONL. Records appended after an interrupted append are the normal
    resume and not counted; `restored` counts records the JSONL had been given and no longer held."""

    restored: int = 0  # finished records the JSONL had lost, appended again
    replaced: int = 0  # records of this job whose content differed from the store's, or that appeared twice
    foreign: int = 0   # non-blank lines this job did not write, kept in place


def _known_key(line: bytes, records: dict[str, str]) -> str | None:
    """The key of a line that is one of this job's records, else None (the line is the user's)."""
    try:
        value = json.loads(line)
    except ValueError:  # not JSON, or not UTF-8
        return None
    key = value.get("key") if isinstance(value, dict) else None
    return key if isinstance(key, str) and key in records else None


class JobStore:
    def __init__(self, database: Path, jsonl: Path):
        self.jsonl = jsonl
        try:
            database.parent.mkdir(parents=True, exist_ok=True)
            jsonl.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise JobStoreError(f"cannot create the folder of {jsonl}: {e.strerror or e}") from None
        self._check_writable()
        try:
            self.db = sqlite3.connect(database, isolation_level=None)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=FULL")
            self.db.execute(_SCHEMA)
        except sqlite3.Error as e:
            raise JobStoreError(f"cannot open the job store {database}: {e}") from None

    @contextmanager
    def _on_jsonl(self, doing: str) -> Iterator[None]:
        """The JSONL's I/O errors as one-line JobStoreErrors ("cannot <doing> the JSONL output ...")."""
        try:
            yield
        except OSError as e:
            raise JobStoreError(f"cannot {doing} the JSONL output {self.jsonl}: {e.strerror or e}") from None

    def _check_writable(self) -> None:
        if self.jsonl.is_dir():
            raise JobStoreError(f"the JSONL output {self.jsonl} is a folder, not a file")
        with self._on_jsonl("write"):
            if self.jsonl.exists():
                open(self.jsonl, "r+b").close()  # writable, and left as it is
            elif not os.access(self.jsonl.parent, os.W_OK):
                raise PermissionError(13, "Permission denied")

    def close(self) -> None:
        self.db.close()

    def lookup(self, key: str) -> tuple[str, dict[str, Any]] | None:
        """(status, record) of a finished page, or None."""
        row = self.db.execute("SELECT status, record FROM pages WHERE key = ?", (key,)).fetchone()
        return (row[0], json.loads(row[1])) if row else None

    def failed_keys(self) -> list[str]:
        return [row[0] for row in self.db.execute("SELECT key FROM pages WHERE status = 'failed'")]

    def _read_lines(self, records: dict[str, str]) -> tuple[list[bytes], bool]:
        """The JSONL's lines (each with its newline, if it has one), and whether a half-written last line
        was cut: an unterminated tail that is the start of one of the store's records (the store commits
        before the append, so a kill during an append leaves exactly that). Any other tail is the user's."""
        with self._on_jsonl("read"):
            try:
                data = self.jsonl.read_bytes()
            except FileNotFoundError:
                return [], False
        lines = [line + b"\n" for line in data.split(b"\n")]
        lines[-1] = lines[-1][:-1]  # the part after the last newline: b"" or an unterminated tail
        tail = lines.pop()
        if tail and tail.strip() and any(r.encode().startswith(tail) for r in records.values()):
            return lines, True
        return lines + [tail] if tail else lines, False

    def reconcile(self, retry: Iterable[str] = ()) -> ReconcileReport:
        """Make the JSONL hold every finished record exactly once, with the store's content, next to the
        user's own lines; drop the records of pages about to be retried (their new record comes later)."""
        retry = set(retry)
        if retry:
            # Unemitted first: a kill before the retry finishes must let the next start re-append them.
            self._mark(retry, emitted=0)
        rows = self.db.execute("SELECT key, record, emitted FROM pages").fetchall()
        records = {key: record for key, record, _ in rows}
        lines, cut = self._read_lines(records)

        kept: list[bytes] = []
        seen: set[str] = set()
        replaced = foreign = 0
        rewrite = False
        for line in lines:
            key = _known_key(line, records)
            if key is None:
                kept.append(line)
                foreign += bool(line.strip())
            elif key in retry:
                rewrite = True
            elif key in seen:
                rewrite, replaced = True, replaced + 1
            else:
                seen.add(key)
                ours = records[key].encode()
                if line.rstrip(b"\r\n") == ours or json.loads(line) == json.loads(ours):
                    kept.append(line)
                else:
                    kept.append(ours + b"\n")
                    rewrite, replaced = True, replaced + 1
        missing = [(key, record, emitted) for key, record, emitted in rows if key not in seen and key not in retry]
        restored = sum(1 for _, _, emitted in missing if emitted)
        added = b"".join(record.encode() + b"\n" for _, record, _ in missing)
        # The user's unterminated last line gets its newline, so that the job's records go on lines of their own.
        terminate = bool(kept) and not kept[-1].endswith(b"\n")
        if rewrite:
            self._replace_with(b"".join(kept) + (b"\n" if terminate else b"") + added)
        else:
            if cut:
                self._truncate(sum(len(line) for line in lines))
            added = (b"\n" if terminate else b"") + added
            if added:
                self._write(added, "ab")
        self._mark([key for key, _, emitted in rows if not emitted and key not in retry], emitted=1)
        return ReconcileReport(restored=restored, replaced=replaced, foreign=foreign)

    def _mark(self, keys: Iterable[str], *, emitted: int) -> None:
        keys = [(emitted, key) for key in keys]
        if keys:
            self.db.execute("BEGIN")
            self.db.executemany("UPDATE pages SET emitted = ? WHERE key = ?", keys)
            self.db.execute("COMMIT")

    def _write(self, data: bytes, mode: str) -> None:
        with self._on_jsonl("write"), open(self.jsonl, mode) as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())

    def _truncate(self, size: int) -> None:
        with self._on_jsonl("write"), open(self.jsonl, "r+b") as f:
            f.truncate(size)
            os.fsync(f.fileno())

    def _replace_with(self, data: bytes) -> None:
        """Rewrite the JSONL atomically: a reader or a kill sees the old file or the new one, never half."""
        with self._on_jsonl("replace"):
            atomic_write(self.jsonl, data)

    def _append(self, line: str) -> None:
        self._write(line.encode() + b"\n", "ab")

    def finish(self, key: str, source: str, page: int, status: str, record: dict[str, Any]) -> None:
        line = json.dumps(record, ensure_ascii=False)
        self.db.execute("INSERT OR REPLACE INTO pages (key, source, page, status, record, emitted, updated) "
                        "VALUES (?, ?, ?, ?, ?, 0, ?)", (key, source, page, status, line, time.time()))
        self._append(line)
        self.db.execute("UPDATE pages SET emitted = 1 WHERE key = ?", (key,))
