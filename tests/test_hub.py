"""Hub specs (`owner/name[:QUANT]`) and their file selection, offline: a hand-made HF cache in tmp (the layout
huggingface_hub reads: models--owner--name/{refs/main, snapshots/<commit>/<file> -> ../../blobs/<hash>}) and a
replaced listing call for the online path. No network, no model."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from minicpmv_edge.runtime import EngineError
from minicpmv_edge.runtime import hub
from minicpmv_edge.runtime.hub import HubSpec, parse_hub_spec, resolve_hub_pair, select_hub_files

REPO = "openbmb/MiniCPM-V-4_5-gguf"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
# What openbmb's GGUF repos hold (MiniCPM-V-4_5-gguf: ggml-model-<QUANT>.gguf; MiniCPM-V-4.6-gguf:
# MiniCPM-V-4_6-<QUANT>.gguf; both mmproj-model-f16.gguf).
LISTING = [".gitattributes", "README.md", "ggml-model-F16.gguf", "ggml-model-BF16.gguf", "ggml-model-Q2_K.gguf",
           "ggml-model-Q4_0.gguf", "ggml-model-Q4_K_M.gguf", "ggml-model-Q4_K_S.gguf", "ggml-model-Q8_0.gguf",
           "mmproj-model-Q8_0.gguf", "mmproj-model-f16.gguf"]


def make_cache(cache: Path, files: list[str], *, repo: str = REPO, commit: str = COMMIT,
               ref: str | None = "main") -> Path:
    """Files of `repo` cached at `commit` the way hf_hub_download leaves them; the snapshot folder."""
    folder = cache / f"models--{repo.replace('/', '--')}"
    snapshot = folder / "snapshots" / commit
    for name in files:
        data = f"dummy {name}".encode()
        blob = folder / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snapshot / name
        link.parent.mkdir(parents=True, exist_ok=True)
        if not link.is_symlink():
            link.symlink_to(os.path.relpath(blob, link.parent))
    snapshot.mkdir(parents=True, exist_ok=True)
    if ref:
        (folder / "refs").mkdir(exist_ok=True)
        (folder / "refs" / ref).write_text(commit)  # no newline, as huggingface_hub writes it
    return snapshot


def one_line_error(call) -> str:  # noqa: ANN001
    with pytest.raises(EngineError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message and message
    return message


@pytest.fixture
def online(monkeypatch: pytest.MonkeyPatch):  # noqa: ANN201
    """The online path with `files` as the repo's listing; fetching caches a dummy file and is recorded."""
    fetched: list[str] = []

    def serve(files: list[str]) -> list[str]:
        monkeypatch.setattr(hub, "_list_remote_files", lambda repo_id: list(files))
        return fetched

    def download(repo_id: str, filename: str, *, cache_dir: Path, revision: str | None,
                 local_files_only: bool) -> str:
        assert revision is None and not local_files_only
        fetched.append(filename)
        return str(make_cache(cache_dir, [filename], repo=repo_id) / filename)

    monkeypatch.setattr(hub, "_download", download)
    return serve


# ---- spec parser ----------------------------------------------------------------------------------------


def test_parse_hub_spec(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert parse_hub_spec(REPO) == HubSpec(REPO, None)
    assert parse_hub_spec(f"{REPO}:Q4_K_M") == HubSpec(REPO, "Q4_K_M")
    assert parse_hub_spec(f"{REPO}:q5_k_m") == HubSpec(REPO, "Q5_K_M")
    assert parse_hub_spec("openbmb/MiniCPM-V-4.6-gguf:ud-q4_k_xl") == HubSpec("openbmb/MiniCPM-V-4.6-gguf", "UD-Q4_K_XL")
    assert str(HubSpec(REPO, "Q8_0")) == f"{REPO}:Q8_0" and str(HubSpec(REPO)) == REPO
    for text in ["", "model.gguf", "/abs/x", "./a/b", "~/a/b", "a/b/c", "a/b.gguf", "a/b.GGUF:Q4_K_M", "a--b/c",
                 "a/b..c", "a/b:", "a/b:Q4:K", "C:/x"]:
        assert parse_hub_spec(text) is None, text
    # An existing local path wins over a spec, with or without a quant.
    (tmp_path / "openbmb" / "MiniCPM-V-4_5-gguf").mkdir(parents=True)
    (tmp_path / "local").mkdir()
    (tmp_path / "local" / "pair:Q4_K_M").write_text("")
    assert parse_hub_spec(REPO) is None
    assert parse_hub_spec("local/pair:Q4_K_M") is None
    assert parse_hub_spec(f"{REPO}:Q4_K_M") == HubSpec(REPO, "Q4_K_M")


# ---- selection ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("quant, model", [(None, "ggml-model-Q4_K_M.gguf"), ("Q4_K_M", "ggml-model-Q4_K_M.gguf"),
                                          ("q4_k_s", "ggml-model-Q4_K_S.gguf"), ("Q8_0", "ggml-model-Q8_0.gguf"),
                                          ("F16", "ggml-model-F16.gguf"), ("bf16", "ggml-model-BF16.gguf")])
def test_selects_quant_and_f16_mmproj(quant: str | None, model: str) -> None:
    assert select_hub_files(LISTING, HubSpec(REPO, quant)) == ([model], "mmproj-model-f16.gguf")


def test_default_quant_falls_back_like_llama_cpp() -> None:
    spec = HubSpec(REPO)
    files = ["ggml-model-Q8_0.gguf", "ggml-model-Q2_K.gguf", "mmproj-model-f16.gguf"]
    assert select_hub_files(files, spec)[0] == ["ggml-model-Q8_0.gguf"]
    files = ["z-Q6_K.gguf", "a-Q5_K_M.gguf", "a-imatrix.gguf", "mmproj-model-f16.gguf"]
    assert select_hub_files(files, spec)[0] == ["a-Q5_K_M.gguf"]


@pytest.mark.parametrize("mmprojs, chosen", [
    (["mmproj-Q8_0.gguf", "mmproj-F32.gguf", "mmproj-BF16.gguf"], "mmproj-BF16.gguf"),
    (["mmproj-model-q8_0.gguf", "mmproj-model-f32.gguf"], "mmproj-model-f32.gguf"),
    (["mmproj-Q4_0.gguf", "mmproj-Q8_0.gguf"], "mmproj-Q8_0.gguf"),
    (["mmproj.gguf"], "mmproj.gguf"),
    (["mmproj-Q6_K.gguf", "mmproj-Q4_0.gguf"], "mmproj-Q4_0.gguf"),  # closest in bits to Q4_K_M
])
def test_mmproj_preference(mmprojs: list[str], chosen: str) -> None:
    assert select_hub_files(["model-Q4_K_M.gguf", *mmprojs], HubSpec(REPO))[1] == chosen


def test_mmproj_beside_the_model_first() -> None:
    files = ["mmproj-F16.gguf", "v2/model-Q4_K_M.gguf", "v2/mmproj-Q8_0.gguf", "v3/mmproj-F16.gguf"]
    assert select_hub_files(files, HubSpec(REPO)) == (["v2/model-Q4_K_M.gguf"], "v2/mmproj-Q8_0.gguf")
    files = ["v2/model-Q4_K_M.gguf", "v3/mmproj-F16.gguf"]  # none above the model: any folder
    assert select_hub_files(files, HubSpec(REPO))[1] == "v3/mmproj-F16.gguf"


SPLIT = [f"MiniCPM-V-4_5-Q8_0-0000{i}-of-00003.gguf" for i in (2, 3, 1)]


def test_split_model_takes_all_parts_in_order() -> None:
    files = ["MiniCPM-V-4_5-Q4_K_M.gguf", *SPLIT, "mmproj-model-f16.gguf"]
    assert select_hub_files(files, HubSpec(REPO, "Q8_0")) == (sorted(SPLIT), "mmproj-model-f16.gguf")


def test_selection_errors_are_one_line() -> None:
    message = one_line_error(lambda: select_hub_files(LISTING, HubSpec(REPO, "Q5_K_M")))
    assert message == (f"{REPO} has no Q5_K_M model file; its quants: BF16, F16, Q2_K, Q4_0, Q4_K_M, Q4_K_S, Q8_0")
    message = one_line_error(lambda: select_hub_files(["README.md", "ggml-model-Q4_K_M.gguf"], HubSpec(REPO)))
    assert message == f"{REPO} has no mmproj GGUF (the vision projector) to go with ggml-model-Q4_K_M.gguf"
    message = one_line_error(lambda: select_hub_files(["README.md", "mmproj-model-f16.gguf"], HubSpec(REPO)))
    assert message == f"{REPO} holds no model GGUF file"
    message = one_line_error(lambda: select_hub_files(SPLIT[1:] + ["mmproj-f16.gguf"], HubSpec(REPO, "Q8_0")))
    assert "lists only 2 of the 3 parts" in message and message.endswith("(missing: MiniCPM-V-4_5-Q8_0-00002-of-00003.gguf)")
    message = one_line_error(lambda: select_hub_files(SPLIT[:2] + ["mmproj-f16.gguf"], HubSpec(REPO, "Q8_0")))
    assert message == (f"{REPO} lists only 2 of the 3 parts of MiniCPM-V-4_5-Q8_0 "
                       "(missing: MiniCPM-V-4_5-Q8_0-00001-of-00003.gguf)")


# ---- offline: the HF cache ------------------------------------------------------------------------------


def test_offline_resolves_from_the_cache_through_huggingface_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                  capfd: pytest.CaptureFixture[str]) -> None:
    snapshot = make_cache(tmp_path / "hub", LISTING)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub, "_list_remote_files", lambda repo_id: pytest.fail("offline lists nothing"))
    model, mmproj = resolve_hub_pair(parse_hub_spec(f"{REPO}:q4_k_m"))
    assert (model, mmproj) == (snapshot / "ggml-model-Q4_K_M.gguf", snapshot / "mmproj-model-f16.gguf")
    assert model.read_bytes() == b"dummy ggml-model-Q4_K_M.gguf"
    assert capfd.readouterr() == ("", "")


def test_offline_split_model(tmp_path: Path) -> None:
    snapshot = make_cache(tmp_path, [*SPLIT, "mmproj-model-f16.gguf"])
    model, _ = resolve_hub_pair(HubSpec(REPO, "Q8_0"), cache_dir=tmp_path, offline=True)
    assert model == snapshot / "MiniCPM-V-4_5-Q8_0-00001-of-00003.gguf"
    (snapshot / SPLIT[0]).unlink()  # part 2 of 3 gone
    message = one_line_error(lambda: resolve_hub_pair(HubSpec(REPO, "Q8_0"), cache_dir=tmp_path, offline=True))
    assert message.startswith(f"offline and the hub cache holds only 2 of the 3 parts of MiniCPM-V-4_5-Q8_0 of {REPO} ")
    assert "missing: MiniCPM-V-4_5-Q8_0-00002-of-00003.gguf" in message


def test_offline_reads_the_snapshot_main_points_to(tmp_path: Path) -> None:
    make_cache(tmp_path, ["ggml-model-Q4_K_M.gguf"], commit="f" * 40, ref=None)  # an older commit
    snapshot = make_cache(tmp_path, ["ggml-model-Q8_0.gguf", "mmproj-model-f16.gguf"])
    model, _ = resolve_hub_pair(HubSpec(REPO), cache_dir=tmp_path, offline=True)
    assert model == snapshot / "ggml-model-Q8_0.gguf"


def test_offline_missing_files_are_one_line(tmp_path: Path) -> None:
    def resolve(quant: str | None):  # noqa: ANN202
        return lambda: resolve_hub_pair(HubSpec(REPO, quant), cache_dir=tmp_path, offline=True)

    assert one_line_error(resolve("Q4_K_M")) == f"offline and the hub cache ({tmp_path}) holds nothing of {REPO}"
    make_cache(tmp_path, ["ggml-model-Q8_0.gguf", "mmproj-model-f16.gguf"])
    assert one_line_error(resolve("Q4_K_M")) == (
        f"offline and the hub cache holds no Q4_K_M model file of {REPO} "
        "(cached: ggml-model-Q8_0.gguf, mmproj-model-f16.gguf)")
    (tmp_path / f"models--{REPO.replace('/', '--')}" / "snapshots" / COMMIT / "mmproj-model-f16.gguf").unlink()
    assert one_line_error(resolve(None)) == (
        f"offline and the hub cache holds no mmproj file of {REPO} (cached: ggml-model-Q8_0.gguf)")


# ---- online, with a replaced listing --------------------------------------------------------------------


def test_online_fetches_the_chosen_files(tmp_path: Path, online) -> None:  # noqa: ANN001
    fetched = online(["MiniCPM-V-4_5-Q4_K_M.gguf", *SPLIT, "mmproj-model-Q8_0.gguf", "mmproj-model-f16.gguf"])
    announced: list[str] = []
    model, mmproj = resolve_hub_pair(HubSpec(REPO, "Q8_0"), cache_dir=tmp_path, offline=False,
                                     on_download=announced.append)
    snapshot = tmp_path / f"models--{REPO.replace('/', '--')}" / "snapshots" / COMMIT
    assert (model, mmproj) == (snapshot / sorted(SPLIT)[0], snapshot / "mmproj-model-f16.gguf")
    assert fetched == announced == [*sorted(SPLIT), "mmproj-model-f16.gguf"]
    # Again: everything is cached, so nothing is announced (hf_hub_download still checks each file).
    announced.clear()
    resolve_hub_pair(HubSpec(REPO, "Q8_0"), cache_dir=tmp_path, offline=False, on_download=announced.append)
    assert announced == []


def test_online_missing_quant_lists_the_repo_quants(tmp_path: Path, online) -> None:  # noqa: ANN001
    fetched = online(LISTING)
    message = one_line_error(lambda: resolve_hub_pair(HubSpec(REPO, "IQ4_XS"), cache_dir=tmp_path, offline=False))
    assert message.startswith(f"{REPO} has no IQ4_XS model file; its quants: BF16, F16, Q2_K,")
    assert fetched == []


def test_unreachable_hub_falls_back_to_the_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def unreachable(repo_id: str) -> list[str]:
        raise ConnectionError("[Errno -2] Name or service not known")

    monkeypatch.setattr(hub, "_list_remote_files", unreachable)
    message = one_line_error(lambda: resolve_hub_pair(HubSpec(REPO), cache_dir=tmp_path, offline=False))
    assert message == (f"the hub is unreachable (ConnectionError: [Errno -2] Name or service not known) and the "
                       f"hub cache ({tmp_path}) holds nothing of {REPO}")
    snapshot = make_cache(tmp_path, LISTING)
    assert resolve_hub_pair(HubSpec(REPO), cache_dir=tmp_path, offline=False)[0] == snapshot / "ggml-model-Q4_K_M.gguf"


def test_failed_fetch_is_one_line(tmp_path: Path, online, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: ANN001
    from huggingface_hub.utils import LocalEntryNotFoundError

    online(LISTING)

    def cannot(*args, **kwargs) -> str:  # noqa: ANN002, ANN003
        raise LocalEntryNotFoundError("An error happened while trying to locate the file on the Hub\nand ...")

    monkeypatch.setattr(hub, "_download", cannot)
    message = one_line_error(lambda: resolve_hub_pair(HubSpec(REPO), cache_dir=tmp_path, offline=False))
    assert message == (f"cannot fetch ggml-model-Q4_K_M.gguf of {REPO}: the hub is unreachable and the hub cache "
                       f"({tmp_path}) does not hold it")
