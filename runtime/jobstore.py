"""A resumable batch job: one SQLite row per page, and a JSONL file that receives each page's record
exactly once, however the process was stopped.

A record is committed to the store first (status done/failed, emitted = 0), then appended to the JSONL and
fsynced, then marked emitted. A kill between those steps leaves an unemitted row; on the next start,
`reconcile` looks at what the JSONL really holds (dropping a half-written last line) and appends only the
records it lacks. So every key appears in the JSONL once."""

from __future__ import annotations

import json
import os
import sqlite3
import time
from pathlib import Path
from typing import Any, Iterable

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


class JobStore:
    def __init__(self, database: Path, jsonl: Path):
        self.jsonl = jsonl
        database.parent.mkdir(parents=True, exist_ok=True)
        jsonl.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(database, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.execute(_SCHEMA)

    def close(self) -> None:
        self.db.close()

    def lookup(self, key: str) -> tuple[str, dict[str, Any]] | None:
        """(status, record) of a finished page, or None."""
        row = self.db.execute("SELECT status, record FROM pages WHERE key = ?", (key,)).fetchone()
        return (row[0], json.loads(row[1])) if row else None

    def _jsonl_keys(self) -> list[str]:
        """Keys in the JSONL, after cutting a half-written last line (a kill during an append)."""
        if not self.jsonl.exists():
            return []
        data = self.jsonl.read_bytes()
        if data and not data.endswith(b"\n"):
            data = data[: data.rfind(b"\n") + 1]
            with open(self.jsonl, "r+b") as f:
                f.truncate(len(data))
        return [json.loads(line)["key"] for line in data.splitlines() if line.strip()]

    def _rewrite_without(self, drop: set[str]) -> None:
        lines = [line for line in self.jsonl.read_text(encoding="utf-8").splitlines(keepends=True)
                 if json.loads(line)["key"] not in drop]
        partial = self.jsonl.with_name(f".{self.jsonl.name}.partial")
        partial.write_text("".join(lines), encoding="utf-8")
        os.replace(partial, self.jsonl)

    def reconcile(self, retry: Iterable[str] = ()) -> None:
        """Make the JSONL hold exactly the emitted records: append what a kill left unwritten, and drop the
        records of pages about to be retried."""
        present = set(self._jsonl_keys())
        retry = set(retry)
        if retry:
            # Unemitted first: a kill before the retry finishes must let the next start re-append them.
            self.db.executemany("UPDATE pages SET emitted = 0 WHERE key = ?", [(k,) for k in retry])
            if retry & present:
                self._rewrite_without(retry & present)
            present -= retry
        for key, record in self.db.execute("SELECT key, record FROM pages WHERE emitted = 0").fetchall():
            if key in retry:
                continue  # about to be processed again; its new record is emitted then
            if key not in present:
                self._append(record)
            self.db.execute("UPDATE pages SET emitted = 1 WHERE key = ?", (key,))

    def failed_keys(self) -> list[str]:
        return [row[0] for row in self.db.execute("SELECT key FROM pages WHERE status = 'failed'")]

    def _append(self, line: str) -> None:
        with open(self.jsonl, "a", encoding="utf-8") as f:
            f.write(line + "\n")
            f.flush()
            os.fsync(f.fileno())

    def finish(self, key: str, source: str, page: int, status: str, record: dict[str, Any]) -> None:
        line = json.dumps(record, ensure_ascii=False)
        self.db.execute("INSERT OR REPLACE INTO pages (key, source, page, status, record, emitted, updated) "
                        "VALUES (?, ?, ?, ?, ?, 0, ?)", (key, source, page, status, line, time.time()))
        self._append(line)
        self.db.execute("UPDATE pages SET emitted = 1 WHERE key = ?", (key,))
