"""GGUF pairs from the Hugging Face hub: `owner/name[:QUANT]` -> (model GGUF, mmproj GGUF) in the HF cache.

    spec = parse_hub_spec("openbmb/MiniCPM-V-4_5-gguf:Q4_K_M")   # None for a local path or a non-spec
    if spec is not None:
        model_path, mmproj_path = resolve_hub_pair(spec)         # raises EngineError with a one-line message

The file selection follows llama.cpp's `-hf` handling (common/download.cpp of the llama.cpp vendored by
llama-cpp-python 0.3.36: `common_download_split_repo_tag`, `get_gguf_split_info`, `gguf_filename_is_model`,
`find_best_model`, `get_split_files`, `find_best_sibling`) with a stricter quant match and the mmproj
preference F16 > BF16 > F32 > Q8_0. Files go to (and come from) the standard HF cache, so `hf download`,
llama.cpp's `-hf` and this module share downloads. Nothing here prints: progress bars and huggingface_hub's
log lines are silenced, and a caller that wants to say what is being fetched passes `on_download`."""

from __future__ import annotations

import contextlib
import importlib
import inspect
import logging
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

from .engine import EngineError

DEFAULT_QUANT = "Q4_K_M"
# What llama.cpp tries when the spec names no quant (find_best_model: {"Q4_K_M", "Q8_0"}, then the first model).
DEFAULT_QUANTS = (DEFAULT_QUANT, "Q8_0")
# The mmproj tags taken first, in this order; the vision tower is small, so the widest type wins.
MMPROJ_PREFERENCE = ("F16", "BF16", "F32", "Q8_0")
# Files whose name holds one of these are sidecars, never the language model (gguf_filename_is_model).
_NOT_MODEL = ("mmproj", "imatrix", "mtp-", "eagle3-", "dflash-", "dspark-")

_NAME = r"[A-Za-z0-9][A-Za-z0-9_.-]{0,95}"
_SPEC = re.compile(rf"({_NAME})/({_NAME})(?::([A-Za-z0-9][A-Za-z0-9_-]*))?")
_REPO_ID = re.compile(rf"{_NAME}/{_NAME}")
_SPLIT = re.compile(r"^(.+)-([0-9]{5})-of-([0-9]{5})$", re.IGNORECASE)  # get_gguf_split_info's re_split
_TAG = re.compile(r"[-.]([A-Z0-9_]+)$", re.IGNORECASE)  # get_gguf_split_info's re_tag
_COMMIT = re.compile(r"[0-9a-f]{40}")


@dataclass(frozen=True)
class HubSpec:
    """A GGUF repo on the hub and the quant to take from it.

    `quant` is upper-cased; None means llama.cpp's default: Q4_K_M, else Q8_0, else the repo's first model file."""

    repo_id: str
    quant: str | None = None

    def __str__(self) -> str:
        return f"{self.repo_id}:{self.quant}" if self.quant else self.repo_id


def parse_hub_spec(text: str) -> HubSpec | None:
    """`owner/name` or `owner/name:QUANT` as a HubSpec; None when `text` is an existing local path or no spec.

    A local file or folder always wins, so `models/x` names the folder when it exists. A name ending in `.gguf`
    is taken for a (missing) local file, not a repo, so the caller reports the missing file."""
    if not text or Path(text).expanduser().exists():
        return None
    match = _SPEC.fullmatch(text)
    if match is None:
        return None
    owner, name, quant = match.groups()
    if "--" in f"{owner}/{name}" or ".." in f"{owner}/{name}" or name.lower().endswith(".gguf"):
        return None  # huggingface_hub rejects "--" and ".." in repo ids
    return HubSpec(f"{owner}/{name}", quant.upper() if quant else None)


def resolve_hub_pair(spec: HubSpec, *, cache_dir: str | Path | None = None, offline: bool | None = None,
                     on_download: Callable[[str], None] | None = None) -> tuple[Path, Path]:
    """(model GGUF, mmproj GGUF) of `spec`, downloaded into the HF cache when missing; raises EngineError.

    Online: lists the repo, picks the files (see `select_hub_files`), and fetches them with `hf_hub_download`
    (a cached file costs one metadata request). A split model has all its parts fetched; the first part is
    returned, and llama.cpp finds the others beside it. When the hub cannot be listed (no connection, an HTTP
    error), this falls back to the cache, as llama.cpp does.
    Offline (`offline=True`, or `offline=None` and HF_HUB_OFFLINE set): only the cache is read, from the
    snapshot that `refs/main` points to (else another ref, else the newest snapshot).

    `cache_dir`: the HF hub cache (default: HF_HUB_CACHE, else HF_HOME/hub, else ~/.cache/huggingface/hub,
    read at call time). `on_download(filename)` is called before fetching a file the cache does not hold yet,
    so a CLI can say what it downloads. The paths returned are the cache's snapshot paths (symlinks to blobs);
    keep them unresolved, since the file names carry the split naming llama.cpp needs."""
    if not _REPO_ID.fullmatch(spec.repo_id):
        raise EngineError(f"{spec.repo_id} is not a hub repo id (owner/name)")
    cache = Path(cache_dir).expanduser() if cache_dir is not None else _default_cache_dir()
    if offline is None:
        offline = _env_offline()
    with _quiet():
        why = "offline"
        if not offline:
            try:
                files = _list_remote_files(spec.repo_id)
            except _hub_errors() as e:
                why = _why_unlisted(spec.repo_id, e)
            else:
                model_files, mmproj = select_hub_files(files, spec)
                paths = [_fetch(spec.repo_id, f, cache, None, on_download) for f in [*model_files, mmproj]]
                return _pair(spec, paths)
        commit, cached = _cached_files(spec.repo_id, cache)
        if commit is None:
            raise EngineError(f"{why} and the hub cache ({cache}) holds nothing of {spec.repo_id}")
        model_files, mmproj = select_hub_files(cached, spec, why=why)
        paths = [_fetch(spec.repo_id, f, cache, commit, None) for f in [*model_files, mmproj]]
        return _pair(spec, paths)


def select_hub_files(files: Iterable[str], spec: HubSpec, *, why: str | None = None) -> tuple[list[str], str]:
    """(model file parts, mmproj file) among a repo's file paths; raises EngineError (one line) when missing.

    Model: a `.gguf` whose name holds none of mmproj/imatrix/mtp-/eagle3-/dflash-/dspark-, whose name (less
    `.gguf` and `-0000k-of-0000n`) ends in `-QUANT` or `.QUANT`, case-insensitive; of a split model the first
    part, then all parts. Without a quant: Q4_K_M, else Q8_0, else the first model file. Among several matches
    the shallowest path, then the alphabetically first.
    mmproj: a `.gguf` whose name holds "mmproj", in the model's folder or the deepest folder above it (any
    folder when none is there); its quant tag F16, else BF16, else F32, else Q8_0, else the only one, else the
    one closest in bits to the model's quant. `why` (e.g. "offline") marks `files` as the cache's content."""
    ggufs = sorted((g for g in map(_Gguf.parse, files) if g is not None), key=_Gguf.order)
    model = _pick_model(ggufs, spec.quant)
    if model is None:
        raise EngineError(_missing_model(spec, ggufs, why))
    parts = [g for g in ggufs if g.prefix == model.prefix and g.count == model.count]
    parts.sort(key=lambda g: g.index)
    missing = sorted(set(range(1, model.count + 1)) - {g.index for g in parts})
    if missing:
        names = ", ".join(f"{model.prefix}-{i:05d}-of-{model.count:05d}.gguf" for i in missing)
        counted = f"{model.count - len(missing)} of the {model.count} parts of {model.prefix}"
        if why:
            raise EngineError(f"{why} and the hub cache holds only {counted} of {spec.repo_id} (missing: {names})")
        raise EngineError(f"{spec.repo_id} lists only {counted} (missing: {names})")
    mmproj = _pick_mmproj(ggufs, model)
    if mmproj is None:
        if why:
            raise EngineError(f"{why} and the hub cache holds no mmproj file of {spec.repo_id} "
                              f"(cached: {_listing(ggufs)})")
        raise EngineError(f"{spec.repo_id} has no mmproj GGUF (the vision projector) to go with {model.path}")
    return [g.path for g in parts], mmproj.path


# ---- selection ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Gguf:
    path: str  # in the repo, "/"-separated
    prefix: str  # path less ".gguf" and the split suffix (get_gguf_split_info's prefix)
    tag: str  # upper-cased quant tag of the name, "" if none
    index: int
    count: int

    @staticmethod
    def parse(path: str) -> _Gguf | None:
        if not path.lower().endswith(".gguf"):
            return None
        prefix, index, count = path[:-5], 1, 1
        split = _SPLIT.match(prefix)
        if split:
            prefix, index, count = split[1], int(split[2]), int(split[3])
        tag = _TAG.search(prefix)
        return _Gguf(path, prefix, tag[1].upper() if tag else "", index, count)

    def order(self) -> tuple[int, str]:
        return self.path.count("/"), self.path.lower()

    @property
    def name(self) -> str:
        return self.path.rsplit("/", 1)[-1].lower()

    @property
    def folders(self) -> list[str]:
        return self.path.split("/")[:-1]

    @property
    def is_model(self) -> bool:
        return not any(word in self.name for word in _NOT_MODEL)

    def has_quant(self, quant: str) -> bool:
        stem = self.prefix.rsplit("/", 1)[-1].upper()
        return stem == quant or stem.endswith(("-" + quant, "." + quant))


def _models(ggufs: list[_Gguf]) -> list[_Gguf]:
    """One entry per model file, a split model's lowest part standing for it (its first, unless that is missing)."""
    lowest: dict[tuple[str, int], _Gguf] = {}
    for g in ggufs:
        key = (g.prefix, g.count)
        if g.is_model and (key not in lowest or g.index < lowest[key].index):
            lowest[key] = g
    return sorted(lowest.values(), key=_Gguf.order)


def _pick_model(ggufs: list[_Gguf], quant: str | None) -> _Gguf | None:
    firsts = _models(ggufs)
    for wanted in [quant.upper()] if quant else DEFAULT_QUANTS:
        match = next((g for g in firsts if g.has_quant(wanted)), None)
        if match is not None:
            return match
    return firsts[0] if firsts and not quant else None


def _bits(tag: str) -> int:
    """extract_quant_bits: the number after the tag's first digit (Q4_K_M -> 4, BF16 -> 16), 0 without one."""
    digits = re.search(r"[0-9]+", tag)
    return int(digits[0]) if digits else 0


def _pick_mmproj(ggufs: list[_Gguf], model: _Gguf) -> _Gguf | None:
    mmprojs = [g for g in ggufs if "mmproj" in g.name and g.index == 1]
    # find_best_sibling: a sibling's folder is the model's folder or one above it, the deepest one winning.
    above = [g for g in mmprojs if g.folders == model.folders[:len(g.folders)]]
    if above:
        deepest = max(len(g.folders) for g in above)
        mmprojs = [g for g in above if len(g.folders) == deepest]
    for tag in MMPROJ_PREFERENCE:
        match = next((g for g in mmprojs if g.tag == tag), None)
        if match is not None:
            return match
    if not mmprojs:
        return None
    return min(mmprojs, key=lambda g: abs(_bits(g.tag) - _bits(model.tag)))


def _quants(ggufs: list[_Gguf]) -> list[str]:
    return sorted({g.tag for g in _models(ggufs) if g.tag})


def _listing(ggufs: list[_Gguf]) -> str:
    return ", ".join(g.path for g in ggufs) or "no GGUF files"


def _missing_model(spec: HubSpec, ggufs: list[_Gguf], why: str | None) -> str:
    what = f"{spec.quant} model file" if spec.quant else "model GGUF"
    if why:
        return f"{why} and the hub cache holds no {what} of {spec.repo_id} (cached: {_listing(ggufs)})"
    quants = _quants(ggufs)
    if not quants and not any(g.is_model for g in ggufs):
        return f"{spec.repo_id} holds no model GGUF file"
    return f"{spec.repo_id} has no {what}; its quants: {', '.join(quants) or 'none named'}"


# ---- huggingface_hub --------------------------------------------------------------------------------------


def _default_cache_dir() -> Path:
    """huggingface_hub's HF_HUB_CACHE rule, read now rather than when huggingface_hub was imported."""
    hub = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    if hub:
        return Path(hub).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME") or "~/.cache", "huggingface")
    return Path(home).expanduser() / "hub"


def _env_offline() -> bool:
    from huggingface_hub import constants

    value = os.environ.get("HF_HUB_OFFLINE")
    if value is not None:
        return value.strip().upper() in ("1", "ON", "YES", "TRUE")
    return bool(constants.HF_HUB_OFFLINE)


def _hub_errors() -> tuple[type[BaseException], ...]:
    """What listing or fetching raises when the hub says no or cannot be reached: OSError covers requests'
    errors and huggingface_hub's (HfHubHTTPError, OfflineModeIsEnabled); httpx's transport errors are not
    OSErrors."""
    errors: list[type[BaseException]] = [OSError]
    for module in ("httpx", "httpx2"):
        with contextlib.suppress(ImportError, AttributeError):
            errors.append(importlib.import_module(module).HTTPError)
    return tuple(errors)


def _short(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:160]}" if text else type(e).__name__


def _why_unlisted(repo_id: str, e: BaseException) -> str:
    from huggingface_hub.utils import GatedRepoError, HfHubHTTPError, OfflineModeIsEnabled, RepositoryNotFoundError

    if isinstance(e, OfflineModeIsEnabled):
        return "offline"
    if isinstance(e, GatedRepoError):
        return f"{repo_id} is gated on the hub (accept its terms there and log in with `hf auth login`)"
    if isinstance(e, RepositoryNotFoundError):
        return f"the hub has no repo {repo_id} (or it is private and needs a token)"
    status = getattr(getattr(e, "response", None), "status_code", None)
    if isinstance(e, HfHubHTTPError) and status is not None:
        return f"the hub answered HTTP {status} for {repo_id}"
    return f"the hub is unreachable ({_short(e)})"


def _list_remote_files(repo_id: str) -> list[str]:
    """The repo's file paths at main (the one network call of the listing; tests replace it)."""
    from huggingface_hub import HfApi

    return list(HfApi().list_repo_files(repo_id))


def _cached_files(repo_id: str, cache: Path) -> tuple[str | None, list[str]]:
    """(commit, file paths) of the cached snapshot llama.cpp's get_cached_ref would read: refs/main, else the
    first other ref, else (beyond llama.cpp) the newest snapshot folder. (None, []) when none is cached.
    A file whose blob is gone (a dangling link) does not count."""
    folder = cache / ("models--" + repo_id.replace("/", "--"))
    snapshots = folder / "snapshots"
    refs = folder / "refs"
    commits: list[str] = []
    if refs.is_dir():
        ref_files = sorted((p for p in refs.rglob("*") if p.is_file()), key=lambda p: p != refs / "main")
        commits = [p.read_text().strip() for p in ref_files]
    if snapshots.is_dir():
        commits += [p.name for p in sorted(snapshots.iterdir(), key=lambda p: -p.stat().st_mtime)]
    for commit in commits:
        snapshot = snapshots / commit
        if _COMMIT.fullmatch(commit) and snapshot.is_dir():
            return commit, sorted(p.relative_to(snapshot).as_posix() for p in snapshot.rglob("*") if p.is_file())
    return None, []


def _cached_path(repo_id: str, filename: str, cache: Path) -> str | None:
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo_id, filename, cache_dir=cache)
    return found if isinstance(found, str) else None


def _download(repo_id: str, filename: str, *, cache_dir: Path, revision: str | None, local_files_only: bool) -> str:
    """hf_hub_download without a progress bar (tests replace it)."""
    from huggingface_hub import hf_hub_download

    kwargs = {}
    if "tqdm_class" in inspect.signature(hf_hub_download).parameters:
        kwargs["tqdm_class"] = _silent_tqdm()
    return hf_hub_download(repo_id, filename, revision=revision, cache_dir=cache_dir,
                           local_files_only=local_files_only, **kwargs)


def _fetch(repo_id: str, filename: str, cache: Path, commit: str | None,
           on_download: Callable[[str], None] | None) -> Path:
    """One file's cache path: from the cache at `commit` (offline), else fetched at main when needed."""
    from huggingface_hub.utils import LocalEntryNotFoundError

    if on_download is not None and commit is None and _cached_path(repo_id, filename, cache) is None:
        on_download(filename)
    try:
        path = _download(repo_id, filename, cache_dir=cache, revision=commit, local_files_only=commit is not None)
        return Path(path)
    except LocalEntryNotFoundError:
        raise EngineError(f"cannot fetch {filename} of {repo_id}: the hub is unreachable and the hub cache "
                          f"({cache}) does not hold it") from None
    except _hub_errors() as e:
        raise EngineError(f"cannot fetch {filename} of {repo_id}: {_short(e)}") from None


def _pair(spec: HubSpec, paths: list[Path]) -> tuple[Path, Path]:
    *model_parts, mmproj = paths
    if len({p.parent for p in model_parts}) > 1:  # parts fetched while main moved to a new commit
        raise EngineError(f"the parts of {model_parts[0].name} of {spec.repo_id} are cached at different "
                          "commits; run again to fetch them at one")
    return model_parts[0], mmproj


def _silent_tqdm() -> type:
    from tqdm.auto import tqdm

    class SilentTqdm(tqdm):  # type: ignore[misc, valid-type]
        def __init__(self, *args, **kwargs) -> None:  # noqa: ANN002, ANN003
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)

    return SilentTqdm


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """huggingface_hub's warnings and log lines (e.g. "Retrying in 1s") off for the block; its progress bars
    too when hf_hub_download cannot take a tqdm class (older huggingface_hub)."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    logger = logging.getLogger("huggingface_hub")
    level = logger.level
    reenable = False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if "tqdm_class" not in inspect.signature(hf_hub_download).parameters and not are_progress_bars_disabled():
            disable_progress_bars()
            reenable = True
        logger.setLevel(logging.CRITICAL)
        try:
            yield
        finally:
            logger.setLevel(level)
            if reenable:
                enable_progress_bars()


__all__ = ["DEFAULT_QUANT", "DEFAULT_QUANTS", "MMPROJ_PREFERENCE", "HubSpec", "parse_hub_spec",
           "resolve_hub_pair", "select_hub_files"]
