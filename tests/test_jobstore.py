"""The job store keeps the JSONL right whatever happened to it between runs: a kill during an append, the
file truncated, deleted, replaced by an older copy, or given lines of someone else's. The store is the truth
for the job's records; every other line is the user's and stays, byte for byte."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from minicpmv_edge.runtime.jobstore import JobStore, JobStoreError, ReconcileReport
from test_ocr import ocr, page_image, records

GARBAGE = [b"not json at all\n", b'{"key": "someone-else", "text": "another job"}\n', b"\xff\xfe binary\n", b"[1, 2]\n"]


@pytest.fixture
def store(tmp_path: Path) -> JobStore:
    store = JobStore(tmp_path / "out.jsonl.sqlite", tmp_path / "out.jsonl")
    yield store
    store.close()


def finish(store: JobStore, *keys: str, status: str = "done") -> None:
    for key in keys:
        store.finish(key, f"{key}.png", 1, status, {"key": key, "text": None if status == "failed" else key.upper(),
                                                     "error": "broken" if status == "failed" else None})


def job_records(path: Path, known: set[str]) -> list[dict]:
    """The records in a JSONL whose key is one of `known`, in file order (other lines skipped)."""
    found = []
    for line in path.read_bytes().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and record.get("key") in known:
            found.append(record)
    return found


def keys(store: JobStore) -> list[str]:
    known = {row[0] for row in store.db.execute("SELECT key FROM pages")}
    return [record["key"] for record in job_records(store.jsonl, known)]


def assert_store_content(store: JobStore) -> None:
    """Each of the job's keys once, with exactly the store's record."""
    lines = store.jsonl.read_text(encoding="utf-8", errors="replace").splitlines()
    for key, record in store.db.execute("SELECT key, record FROM pages"):
        assert [line for line in lines if line.startswith(f'{{"key": "{key}"')] == [record]


def test_a_half_written_line_is_cut_and_what_is_missing_appended(store: JobStore) -> None:
    finish(store, "a")
    line = json.dumps({"key": "b", "text": "B"})
    store.db.execute("INSERT INTO pages VALUES ('b', 'y.png', 1, 'done', ?, 0, 0)", (line,))
    with open(store.jsonl, "a") as f:
        f.write(line[:15])  # killed mid-append: the start of the record the store committed first
    assert store.reconcile() == ReconcileReport()  # finishing an interrupted append is the normal resume
    assert keys(store) == ["a", "b"]
    assert_store_content(store)


def test_a_truncated_jsonl_gets_its_records_back(store: JobStore) -> None:
    finish(store, "a", "b", "c", "d")
    store.jsonl.write_bytes(store.jsonl.read_bytes().splitlines(keepends=True)[0])
    assert store.reconcile() == ReconcileReport(restored=3)
    assert keys(store) == ["a", "b", "c", "d"]
    assert store.reconcile() == ReconcileReport()  # nothing left to do, and nothing written
    assert keys(store) == ["a", "b", "c", "d"]


def test_a_deleted_jsonl_is_written_again(store: JobStore) -> None:
    finish(store, "a", "b")
    finish(store, "c", status="failed")
    store.jsonl.unlink()
    assert store.reconcile() == ReconcileReport(restored=3)
    assert keys(store) == ["a", "b", "c"]
    assert_store_content(store)


def test_an_older_copy_is_replaced_by_the_store_records(store: JobStore) -> None:
    finish(store, "a", "b", "c")
    old = [json.loads(line) for line in store.jsonl.read_text().splitlines()][:2]
    old[1]["text"] = "an older answer"
    store.jsonl.write_text("".join(json.dumps(r) + "\n" for r in old + [old[0]]))  # and a repeated record
    assert store.reconcile() == ReconcileReport(restored=1, replaced=2)
    assert keys(store) == ["a", "b", "c"]
    assert_store_content(store)
    assert not list(store.jsonl.parent.glob(".*.partial"))


def test_lines_the_job_did_not_write_stay_where_they_are(store: JobStore) -> None:
    finish(store, "a", "b")
    data = store.jsonl.read_bytes()
    first, second = data.splitlines(keepends=True)
    store.jsonl.write_bytes(GARBAGE[0] + first + GARBAGE[1] + b"\n" + GARBAGE[2] + GARBAGE[3] + b"a note, no newline")
    report = store.reconcile()
    assert report == ReconcileReport(restored=1, foreign=5)  # b had been lost; the blank line is not counted
    assert store.jsonl.read_bytes() == (GARBAGE[0] + first + GARBAGE[1] + b"\n" + GARBAGE[2] + GARBAGE[3]
                                        + b"a note, no newline\n" + second)
    finish(store, "c")
    assert keys(store) == ["a", "b", "c"]
    assert store.reconcile() == ReconcileReport(foreign=5)


def test_an_older_copy_among_foreign_lines_is_rewritten_around_them(store: JobStore) -> None:
    finish(store, "a", "b")
    first, second = store.jsonl.read_bytes().splitlines(keepends=True)
    stale = json.dumps({"key": "a", "text": "old"}).encode() + b"\n"
    store.jsonl.write_bytes(GARBAGE[0] + stale + GARBAGE[2] + second + b"tail")
    assert store.reconcile() == ReconcileReport(replaced=1, foreign=3)
    assert store.jsonl.read_bytes() == GARBAGE[0] + first + GARBAGE[2] + second + b"tail\n"


def test_retry_drops_the_old_record_and_keeps_garbage(store: JobStore) -> None:
    finish(store, "a")
    finish(store, "f", status="failed")
    with open(store.jsonl, "ab") as f:
        f.write(b"".join(GARBAGE))
    assert store.reconcile(retry=store.failed_keys()) == ReconcileReport(foreign=len(GARBAGE))
    assert keys(store) == ["a"] and store.jsonl.read_bytes().endswith(b"".join(GARBAGE))
    finish(store, "f", status="failed")
    assert keys(store) == ["a", "f"]
    assert store.reconcile() == ReconcileReport(foreign=len(GARBAGE))


def test_a_retry_killed_before_it_ran_appends_the_old_record_again(store: JobStore) -> None:
    finish(store, "f", status="failed")
    store.reconcile(retry=["f"])  # the old record leaves the JSONL; then a kill before the page is redone
    assert keys(store) == []
    assert store.reconcile() == ReconcileReport()
    assert keys(store) == ["f"]


def test_an_unusable_jsonl_is_a_job_store_error(tmp_path: Path) -> None:
    (tmp_path / "folder.jsonl").mkdir()
    with pytest.raises(JobStoreError, match="is a folder"):
        JobStore(tmp_path / "a.sqlite", tmp_path / "folder.jsonl")
    (tmp_path / "file").write_text("")
    with pytest.raises(JobStoreError, match="cannot create the folder"):
        JobStore(tmp_path / "b.sqlite", tmp_path / "file" / "out.jsonl")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes read-only files")
def test_a_read_only_jsonl_is_a_job_store_error(tmp_path: Path) -> None:
    (tmp_path / "out.jsonl").write_text("")
    (tmp_path / "out.jsonl").chmod(0o444)
    with pytest.raises(JobStoreError, match="cannot write"):
        JobStore(tmp_path / "c.sqlite", tmp_path / "out.jsonl")


@pytest.fixture(scope="module")
def model_dir(converted) -> Path:  # noqa: ANN001 - the same conversion as test_ocr's
    return converted("minicpm-v-4.5", "q8_0").llm_path.parent


def test_cli_puts_a_damaged_jsonl_right_between_runs(model_dir: Path, tmp_path: Path) -> None:
    scans = tmp_path / "scans"
    scans.mkdir()
    for i in range(2):
        page_image(i).save(scans / f"scan{i}.png")
    (scans / "corrupt.png").write_bytes(b"\x89PNG broken")  # one failed page: every run exits 1
    output = tmp_path / "pages.jsonl"

    def run(*extra: str) -> str:
        proc = ocr(model_dir, scans, output, *extra)
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 1 and "Traceback" not in err, err
        got = [(Path(r["source"]).name, r["error"] is None) for r in job_records(output, known)]
        assert sorted(got) == [("corrupt.png", False), ("scan0.png", True), ("scan1.png", True)], got
        return err

    assert ocr(model_dir, scans, output).communicate(timeout=300) and output.exists()
    first, older = output.read_bytes(), records(output)
    known = {r["key"] for r in older}
    assert "restored" not in run()  # a plain rerun: nothing to put right
    assert output.read_bytes() == first

    output.write_bytes(first.splitlines(keepends=True)[0])  # truncated
    assert "restored 2 records missing from pages.jsonl" in run()
    output.unlink()  # deleted
    assert "restored 3 records missing from pages.jsonl" in run()
    older[0]["text"] = "an older answer"  # an older copy, restored without its last line
    output.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in older[:2]), encoding="utf-8")
    err = run()
    assert "replaced 1 stale or repeated record in pages.jsonl" in err and "restored 1 record missing" in err
    assert output.read_bytes() == first
    with open(output, "ab") as f:  # garbage, then a retry of the failed page
        f.write(b"".join(GARBAGE))
    assert "kept 4 lines of pages.jsonl that this job did not write" in run()
    err = run("--retry-failed")
    assert "kept 4 lines" in err and "restored" not in err and "replaced" not in err, err
    assert b"".join(GARBAGE) in output.read_bytes()

    (tmp_path / "folder.jsonl").mkdir()  # the output is a folder: one line, before the model loads
    proc = ocr(model_dir, scans, tmp_path / "folder.jsonl")
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1 and err.startswith("error: ") and "is a folder" in err and err.count("\n") == 1, err
