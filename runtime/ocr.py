"""Batch OCR over images, folders, globs and PDFs with one model load, resumable and exactly-once.

`run_batch` is the whole job (what `minicpmv ocr` runs): expand the inputs, open the job store, load the
model once, OCR every page not done yet and return a `Summary`. Its parts: `iter_pages` expands the inputs
into pages (a PDF page rendered at the chosen DPI with pypdfium2); `run_ocr` hands the pages not done yet to
a `PageRunner` (`local_runner`: `ocr_page` after `ocr_page` in this process; `ray_ocr.RayPool`: actors on a
Ray cluster), records each result in the job store before it reaches the JSONL, and yields one `PageResult`
per page. `ocr_page` asks the model with greedy decoding (so a rerun gives the same text) and turns a page's
failure into its record."""

from __future__ import annotations

import collections
import fnmatch
import glob
import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Protocol, Sequence, Union, runtime_checkable

from PIL import Image

from minicpmv_edge.common.files import atomic_write

from .embedding_cache import DEFAULT_MEMORY_BYTES, EmbeddingCache
from .engine import EngineError, Sampling
from .images import ImageInputError, load_image
from .jobstore import JobStore, JobStoreError, ReconcileReport
from .model import ChatAnswer, Model, load
from .vision import VisionError

PROMPTS = {
    "text": "Extract all the text in this image, in reading order. Output only the text.",
    "markdown": "Convert this page to Markdown: keep headings, lists and paragraphs, and write tables as "
                "Markdown tables. Output only the Markdown.",
}
PDF_SUFFIX = ".pdf"


class OcrInputError(ValueError):
    """An OCR input that names nothing (no such path, or a glob that matches no file)."""


@dataclass(frozen=True)
class PageRef:
    source: str
    page: int  # 1-based; 1 for an image file
    is_pdf: bool = False

    @property
    def label(self) -> str:
        return f"{self.source}#{self.page}" if self.is_pdf else self.source


@dataclass
class PageResult:
    ref: PageRef
    status: str  # done | failed | skipped (done in an earlier run)
    record: dict = field(default_factory=dict)


@dataclass
class OcrOptions:
    mode: str = "text"
    prompt: str | None = None
    max_new_tokens: int = 1024
    max_slice_nums: int | None = None
    dpi: int = 150
    small_image_upsize: str | None = None  # MiniCPM-OCR's sizing of small images and slices; None: the model's
    ignore_eos: bool = False  # every page generates max_new_tokens (benchmarks: the same work for every engine)

    @property
    def question(self) -> str:
        return self.prompt or PROMPTS[self.mode]

    @property
    def sampling(self) -> Sampling:
        """Greedy, so a rerun gives the same text."""
        return Sampling(ignore_eos=self.ignore_eos)


def parse_page_ranges(spec: str | None) -> set[int] | None:
    """'1-3,5' -> {1, 2, 3, 5}; None means every page."""
    if not spec:
        return None
    pages: set[int] = set()
    try:
        for part in spec.split(","):
            first, _, last = part.strip().partition("-")
            pages.update(range(int(first), int(last or first) + 1))
    except ValueError:
        raise OcrInputError(f"page ranges look like 1-3,5; got {spec!r}") from None
    return pages


def _files(inputs: Iterable[str], include: Sequence[str], exclude: Sequence[str]) -> Iterator[Path]:
    def wanted(path: Path) -> bool:
        name = path.name
        return any(fnmatch.fnmatch(name, p) for p in include) and not any(fnmatch.fnmatch(name, p) for p in exclude)

    for item in inputs:
        path = Path(item).expanduser()
        if path.is_dir():
            yield from (p for p in sorted(path.rglob("*")) if p.is_file() and wanted(p))
        elif path.exists():
            yield path
        elif glob.has_magic(item):
            matches = sorted(Path(p) for p in glob.glob(item, recursive=True))
            if not matches:
                raise OcrInputError(f"the pattern {item} matches no file")
            yield from (p for p in matches if p.is_file() and wanted(p))
        else:
            raise OcrInputError(f"no such file or folder: {item}")


def iter_pages(inputs: Iterable[str], *, include: Sequence[str] = ("*",), exclude: Sequence[str] = (),
               pages: set[int] | None = None) -> Iterator[PageRef]:
    """Pages of the inputs in order. A PDF that cannot be opened yields page 0, which then fails with
    the reason; page ranges apply to PDFs."""
    import pypdfium2

    for path in _files(inputs, include, exclude):
        if path.suffix.lower() != PDF_SUFFIX:
            yield PageRef(str(path), 1)
            continue
        try:
            count = len(pypdfium2.PdfDocument(str(path)))
        except pypdfium2.PdfiumError:
            yield PageRef(str(path), 0, is_pdf=True)
            continue
        yield from (PageRef(str(path), n, is_pdf=True) for n in range(1, count + 1) if pages is None or n in pages)


def _content_hash(ref: PageRef, dpi: int, file_digests: dict[str, str]) -> str:
    """The file's sha256 (computed once per file: a PDF's pages share it) plus, for a PDF, page and DPI."""
    if ref.source not in file_digests:
        file_digests[ref.source] = hashlib.sha256(Path(ref.source).read_bytes()).hexdigest()
    digest = file_digests[ref.source]
    return f"{digest}:p{ref.page}:dpi{dpi}" if ref.is_pdf else digest


def render_page(ref: PageRef, dpi: int) -> Image.Image:
    if not ref.is_pdf:
        return load_image(ref.source)
    import pypdfium2

    try:
        document = pypdfium2.PdfDocument(ref.source)
        if not 1 <= ref.page <= len(document):
            raise ImageInputError(f"{ref.source} cannot be opened as a PDF" if ref.page == 0
                                  else f"{ref.source} has no page {ref.page}")
        return document[ref.page - 1].render(scale=dpi / 72).to_pil().convert("RGB")
    except pypdfium2.PdfiumError as e:
        raise ImageInputError(f"cannot render page {ref.page} of {ref.source}: {e}") from None


def job_key(content_hash: str, model_id: str, options: OcrOptions) -> str:
    # The sizing mode joins the identity only when given, so jobs started before it existed resume as they were.
    identity = json.dumps([content_hash, model_id, options.question, options.max_new_tokens,
                           options.max_slice_nums, options.dpi]
                          + ([options.small_image_upsize] if options.small_image_upsize else [])
                          + (["ignore_eos"] if options.ignore_eos else []))
    return hashlib.sha256(identity.encode()).hexdigest()[:32]


@dataclass(frozen=True)
class PageTask:
    """A page not done yet: where it is, its job key and the content hash the key was made from."""

    ref: PageRef
    key: str
    content_hash: str


@dataclass(frozen=True)
class ModelFacts:
    """What a page's record says about the model: its identity (part of every job key) and the settings a
    page gets where the options leave them open."""

    identity: str
    max_slice_nums: int
    small_image_upsize: str

    @classmethod
    def of(cls, model: Model) -> "ModelFacts":
        return cls(model.identity, model.max_slice_nums, model.settings.small_image_upsize)


# OCRs the pages it is given: one (task, status, record) per task, in any order (status: done | failed).
PageRunner = Callable[[Iterable[PageTask]], Iterator[tuple[PageTask, str, dict]]]


@runtime_checkable
class PagePool(Protocol):
    """Workers outside this process that hold the model (`ray_ocr.RayPool`). `start` readies them and returns
    the facts of the model they hold and the runner that OCRs pages on them; the caller closes the pool."""

    def start(self, options: OcrOptions) -> tuple[ModelFacts, PageRunner]: ...

    def close(self) -> None: ...


def page_record(task: PageTask, model: ModelFacts, options: OcrOptions) -> dict:
    """A page's record before its answer: what was asked of which model about which content."""
    ref = task.ref
    return {"key": task.key, "source": ref.source, "page": ref.page, "content_hash": task.content_hash,
            "model": model.identity, "mode": options.mode,
            "prompt": options.question, "max_slice_nums": options.max_slice_nums or model.max_slice_nums,
            "dpi": options.dpi if ref.is_pdf else None,
            "small_image_upsize": options.small_image_upsize or model.small_image_upsize}


def failed_page(record: dict, error: Exception | str, started: float) -> tuple[str, dict]:
    record.update(text=None, error=" ".join(str(error).split()), seconds=round(time.perf_counter() - started, 3))
    return "failed", record


# The errors that fail one page (the batch goes on); anything else is a defect and ends the run.
PAGE_ERRORS = (ImageInputError, EngineError, VisionError, OSError)


def ocr_page(model: Model, task: PageTask, options: OcrOptions, image: Image.Image | None = None) -> tuple[str, dict]:
    """OCR one page, rendered here unless `image` is given: ("done" or "failed", its record)."""
    record, started = page_record(task, ModelFacts.of(model), options), time.perf_counter()
    try:
        image = render_page(task.ref, options.dpi) if image is None else image
        answer = ChatAnswer.of(model.stream_generate(
            [{"role": "user", "content": [image, options.question]}], max_new_tokens=options.max_new_tokens,
            sampling=options.sampling, max_slice_nums=options.max_slice_nums,
            small_image_upsize=options.small_image_upsize))
    except PAGE_ERRORS as e:
        return failed_page(record, e, started)
    return done_page(record, answer, started)


def done_page(record: dict, answer: ChatAnswer, started: float) -> tuple[str, dict]:
    record.update(text=answer.text, timings=answer.timings, error=None,
                  seconds=round(time.perf_counter() - started, 3))
    return "done", record


def local_runner(model: Model, options: OcrOptions) -> PageRunner:
    """Pages OCRed one after the other by a model loaded in this process."""
    return lambda tasks: ((task, *ocr_page(model, task, options)) for task in tasks)


# Pages in flight together on one context by default (`--parallel`). Measured (bench/results/throughput-*.md,
# 2 cores, AVX-512 + AMX, full-size Q4_K_M pairs, dense pages, EOS ignored): 4.6 (256 tokens) --parallel 1..4 gave
# 1.37, 1.52, 1.53, 1.58 pages/min; 4.5 (192 tokens) --parallel 1 and 3 gave 0.36 and 0.45 (batched decode steps
# read the weights once for every page). 3 is measured on both families, within 3% of 4 on 4.6, and holds less KV
# cache (4.5: ~150 KB per position per sequence).
DEFAULT_PARALLEL = 3


def parallel_runner(model: Model, options: OcrOptions, n_parallel: int) -> PageRunner:
    """Pages OCRed `n_parallel` at a time as sequences of one context (the scheduler's continuous batching),
    handed back in input order; pages are rendered here while the scheduler works on earlier ones."""
    from .scheduler import GenerationRequest, Scheduler

    facts = ModelFacts.of(model)
    ahead = 2 * n_parallel  # pages submitted beyond the running ones, so a finished sequence never waits
    prompt = {"max_slice_nums": options.max_slice_nums, "small_image_upsize": options.small_image_upsize}

    def finished(task: PageTask, record: dict, started: float, handle: object) -> tuple[PageTask, str, dict]:
        if isinstance(handle, Exception):
            return task, *failed_page(record, handle, started)
        try:
            return task, *done_page(record, ChatAnswer.of(handle), started)
        except PAGE_ERRORS as e:
            return task, *failed_page(record, e, started)

    def run(tasks: Iterable[PageTask]) -> Iterator[tuple[PageTask, str, dict]]:
        in_flight: collections.deque = collections.deque()
        with Scheduler(model, n_parallel=n_parallel, max_queue=ahead + n_parallel) as scheduler:
            for task in tasks:
                record, started = page_record(task, facts, options), time.perf_counter()
                try:
                    image = render_page(task.ref, options.dpi)
                    handle: object = scheduler.submit(GenerationRequest(
                        [{"role": "user", "content": [image, options.question]}], options.max_new_tokens,
                        options.sampling, prompt))
                except PAGE_ERRORS as e:
                    handle = e
                in_flight.append((task, record, started, handle))
                if len(in_flight) > ahead:
                    yield finished(*in_flight.popleft())
            while in_flight:
                yield finished(*in_flight.popleft())

    return run


def run_ocr(runner: PageRunner, refs: Iterable[PageRef], store: JobStore, options: OcrOptions, *, model_id: str,
            retry_failed: bool = False, text_dir: Path | None = None,
            on_reconcile: Callable[[ReconcileReport], None] | None = None) -> Iterator[PageResult]:
    """OCR every page not done yet with `runner`; yields one result per page (skipped pages first). Before the
    first page, the store puts the JSONL right and `on_reconcile` (if given) receives what it fixed. Each
    record reaches the store, then the JSONL, as the runner hands it back."""
    work = []
    file_digests: dict[str, str] = {}
    for ref in refs:
        try:
            content_hash = _content_hash(ref, options.dpi, file_digests)
        except OSError as e:
            content_hash = f"unreadable:{ref.label}:{e}"
        work.append((ref, content_hash, job_key(content_hash, model_id, options)))
    report = store.reconcile(retry=store.failed_keys() if retry_failed else ())
    if on_reconcile is not None:
        on_reconcile(report)

    def finished_before(ref: PageRef, key: str) -> PageResult:
        status, record = store.lookup(key)
        return PageResult(ref, "skipped" if status == "done" else "failed", record)

    pending: dict[str, PageTask] = {}
    repeats = []  # a page named twice in the inputs is OCRed once and reported as skipped the second time
    for ref, content_hash, key in work:
        finished = store.lookup(key)
        if finished and (finished[0] == "done" or not retry_failed):
            # A page that failed before stays failed (and counts as such) until --retry-failed.
            yield finished_before(ref, key)
        elif key in pending:
            repeats.append((ref, key))
        else:
            pending[key] = PageTask(ref, key, content_hash)
    for task, status, record in runner(pending.values()):
        if status == "done" and text_dir is not None:
            _write_text(text_dir, task.ref, record["text"], options.mode)
        store.finish(task.key, task.ref.source, task.ref.page, status, record)
        yield PageResult(task.ref, status, record)
    yield from (finished_before(ref, key) for ref, key in repeats)


def _write_text(folder: Path, ref: PageRef, text: str, mode: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    stem = Path(ref.source).stem + (f"-p{ref.page:04d}" if ref.is_pdf else "")
    atomic_write(folder / f"{stem}.{'md' if mode == 'markdown' else 'txt'}", (text + "\n").encode("utf-8"))


@dataclass
class Summary:
    """What a batch did: pages OCRed now, skipped (done in an earlier run), failed (now or before, until
    retried), pages OCRed per minute of this run, and the JSONL written."""

    done: int = 0
    skipped: int = 0
    failed: int = 0
    pages_per_min: float = 0.0
    output: Path = Path()

    def as_dict(self) -> dict:
        """The summary as `minicpmv ocr --json` prints it."""
        return {**asdict(self), "output": str(self.output)}


# A model to load (a folder, a hub spec, or the model GGUF and the mmproj GGUF), a loaded one, or workers
# elsewhere that hold one (a PagePool).
ModelSpec = Union[Model, PagePool, str, Path, Sequence[Union[str, Path]]]


def run_batch(model: ModelSpec, inputs: Iterable[str], output: str | Path, options: OcrOptions | None = None, *,
              include: Sequence[str] = ("*",), exclude: Sequence[str] = (), pages: str | set[int] | None = None,
              retry_failed: bool = False, text_dir: Path | None = None, embedding_cache: Path | None = None,
              embedding_cache_bytes: int = 2 << 30, embedding_memory_bytes: int = DEFAULT_MEMORY_BYTES,
              n_threads: int | None = None, parallel: int = DEFAULT_PARALLEL,
              on_start: Callable[[int], None] | None = None,
              on_page: Callable[[PageResult, Summary], None] | None = None,
              on_reconcile: Callable[[ReconcileReport], None] | None = None) -> Summary:
    """OCR the pages of `inputs` into the JSONL `output` (a job store `output.sqlite` beside it makes reruns
    resume) with one model load. `pages` selects PDF pages ('1-3,7'). A model given by name is loaded with
    `n_threads` and `embedding_memory_bytes` and closed at the end; a loaded one is the caller's (it gets the
    disk cache, if one is named); so is a PagePool (its workers load their own model, and the disk cache, which
    lives on this machine, is not for them). `parallel` pages are OCRed together as sequences of one context
    (a pool has its own workers instead). `on_start` receives the number of pages once the model is ready, `on_page`
    each page's result with the counts so far, `on_reconcile` what the store fixed in the JSONL.

    Bad inputs (nothing matches, no pages, an unwritable output) raise OcrInputError before the model loads."""
    options, output = options or OcrOptions(), Path(output)
    if options.mode not in PROMPTS:
        raise OcrInputError(f"the mode is one of {', '.join(PROMPTS)}, not {options.mode!r}")
    ranges = parse_page_ranges(pages) if isinstance(pages, str) or pages is None else set(pages)
    refs = list(iter_pages(inputs, include=include, exclude=exclude, pages=ranges))
    if not refs:
        raise OcrInputError("the inputs hold no pages")
    if isinstance(model, PagePool) and embedding_cache is not None:
        raise OcrInputError("the embedding cache lives on this machine; a worker pool does not use it")
    try:  # before the model loads: an output that cannot be written fails at once
        store = JobStore(output.with_name(output.name + ".sqlite"), output)
    except JobStoreError as e:
        raise OcrInputError(str(e)) from None
    owned = not isinstance(model, (Model, PagePool))
    try:
        if owned:
            model = load(*((model,) if isinstance(model, (str, Path)) else model), n_threads=n_threads,
                         embedding_memory_bytes=embedding_memory_bytes)
        if isinstance(model, PagePool):
            facts, runner = model.start(options)
        else:
            facts = ModelFacts.of(model)
            runner = parallel_runner(model, options, parallel) if parallel > 1 else local_runner(model, options)
    except BaseException:
        store.close()
        if owned and isinstance(model, Model):
            model.close()
        raise
    if embedding_cache is not None:
        model.disk_cache = EmbeddingCache(embedding_cache, model.identity, max_bytes=embedding_cache_bytes)

    summary, started = Summary(output=output), time.perf_counter()

    def clock() -> None:
        minutes = (time.perf_counter() - started) / 60
        summary.pages_per_min = round(summary.done / minutes, 2) if minutes else 0.0

    try:
        if on_start is not None:
            on_start(len(refs))
        for result in run_ocr(runner, refs, store, options, model_id=facts.identity, retry_failed=retry_failed,
                              text_dir=text_dir, on_reconcile=on_reconcile):
            setattr(summary, result.status, getattr(summary, result.status) + 1)  # done | skipped | failed
            clock()
            if on_page is not None:
                on_page(result, summary)
    except JobStoreError as e:
        raise OcrInputError(str(e)) from None
    finally:
        store.close()
        if owned:
            model.close()
    clock()
    return summary
