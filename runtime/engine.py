"""llama.cpp's decoder through llama-cpp-python's low-level API: a model, one context whose KV cache holds
the conversation so far, and decoding of token ids and image embeddings at consecutive positions.

The KV cache is reused across calls: `feed` drops only what no longer matches the new prompt, so a second
turn re-encodes neither the history's text nor its images. The context holds one or more sequences (`slots`),
each with its own cache and history; `decode` puts runs of several sequences into one batch (what the
multi-sequence scheduler, `scheduler.py`, builds its steps from)."""

from __future__ import annotations

import ctypes
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Protocol, Sequence

import llama_cpp
import numpy as np

from .compute import on_compute_thread


class EngineError(RuntimeError):
    """The language model could not be loaded or the prompt does not fit the context."""


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    seed: int = 0
    ignore_eos: bool = False  # end-of-generation tokens are never sampled (fixed-length answers for benchmarks)


_BACKEND_READY = False


@llama_cpp.llama_log_callback
def _silent_log(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:  # noqa: ARG001
    return None


def init_backend() -> None:
    """Start llama.cpp once per process, with its (and mtmd's) logging off: the CLI prints its own."""
    global _BACKEND_READY
    if not _BACKEND_READY:
        from llama_cpp import mtmd_cpp

        llama_cpp.llama_backend_init()
        llama_cpp.llama_log_set(_silent_log, ctypes.c_void_p(0))
        mtmd_cpp.mtmd_log_set(_silent_log, ctypes.c_void_p(0))
        mtmd_cpp.mtmd_helper_log_set(_silent_log, ctypes.c_void_p(0))
        _BACKEND_READY = True


class PositionPlan(Protocol):
    """Explicit M-RoPE positions for every prompt item (MiniCPM-V 4.7's canvas M-RoPE)."""

    def positions(self, items: Sequence[object]) -> np.ndarray:
        """int32 [len(items), 4]: row i holds item i's four position sections."""

    def token_rows(self, tokens: Sequence[int]) -> np.ndarray:
        """float32 [len(tokens), n_embd]: the token embeddings of text items."""


@dataclass
class SequenceSlot:
    """One llama.cpp sequence of the context: `history` mirrors what its part of the KV cache holds (token
    ids, and (piece key, row) pairs for positions filled by a row of an image piece's embeddings)."""

    seq_id: int
    history: list[object] = field(default_factory=list)
    embeddings: Mapping[object, np.ndarray] = field(default_factory=dict)
    plan: PositionPlan | None = None
    logits_index: int = -1  # index in the last decoded batch of this sequence's newest item

    def shared_prefix(self, items: Sequence[object], limit: int | None = None) -> int:
        """How many leading `items` the sequence's cache already holds (at most `limit`)."""
        limit = min(len(self.history), len(items)) if limit is None else limit
        common = 0
        while common < limit and self.history[common] == items[common]:
            common += 1
        return common


@dataclass(frozen=True)
class Run:
    """Items [start, end) of `items` to decode into `slot`, whose cache holds items[:start]."""

    slot: SequenceSlot
    items: Sequence[object]
    start: int
    end: int
    all_logits: bool = False  # logits for every item, not only for the prompt's last one

    @property
    def as_embeddings(self) -> bool:
        """Decoded as embedding rows: image rows, and with a position plan every item."""
        return self.slot.plan is not None or not isinstance(self.items[self.start], int)


class Engine:
    """A llama.cpp model and one context holding `n_seq_max` sequences (`slots`), each with its own part of
    the KV cache and its own history; the single-sequence calls (`feed`, `append_token`, `sample`) act on
    slot 0 unless told otherwise. `n_ctx` counts positions per sequence."""

    def __init__(self, path: Path, *, n_ctx: int, n_threads: int, n_batch: int = 512, repack: bool = False,
                 n_seq_max: int = 1):
        # Everything close() reads exists before anything can raise, so cleanup after a failed load is silent.
        self.model = None
        self.ctx = None
        init_backend()
        params = llama_cpp.llama_model_default_params()
        params.use_mmap = True
        # Weight repacking costs load time and a second copy of the weights for no speed on AVX2 (measured), and on
        # AMX CPUs the pinned build's AMX matmul segfaults on prompt batches (ggml_backend_amx_mul_mat,
        # llama.cpp issue 20824; reproduced with the full-size 4.6 Q4_K_M from 16-token batches on).
        params.use_extra_bufts = repack
        self.model = llama_cpp.llama_model_load_from_file(str(path).encode(), params)
        if not self.model:
            raise EngineError(f"cannot load the language model from {path}")
        self.vocab = llama_cpp.llama_model_get_vocab(self.model)
        self.n_embd = llama_cpp.llama_model_n_embd(self.model)
        # M-RoPE decoders (Qwen3.5) take four position sections per embedding row; MiniCPM-V gives image rows
        # plain sequential positions, so the first three sections repeat the position and the fourth is 0.
        self.mrope = llama_cpp.llama_model_rope_type(self.model) in (
            llama_cpp.LLAMA_ROPE_TYPE_MROPE, llama_cpp.LLAMA_ROPE_TYPE_IMROPE)
        self.n_threads, self.n_batch = n_threads, n_batch
        self._end_tokens: list[int] | None = None
        self.slots: list[SequenceSlot] = []
        self._create_context(n_ctx, n_seq_max)

    @property
    def history(self) -> list[object]:
        return self.slots[0].history

    @property
    def n_seq_max(self) -> int:
        return len(self.slots)

    def configure(self, *, n_ctx: int, n_seq_max: int) -> None:
        """A new context of `n_seq_max` sequences of `n_ctx` positions each (every sequence starts empty)."""
        self._create_context(n_ctx, n_seq_max)

    def _create_context(self, n_ctx: int, n_seq_max: int = 0) -> None:
        n_seq_max = n_seq_max or len(self.slots)
        if self.ctx:
            llama_cpp.llama_free(self.ctx)
            self.ctx = None
        params = llama_cpp.llama_context_default_params()
        # Not unified: each sequence attends over its own KV stream of n_ctx cells, as a lone sequence would.
        params.n_ctx = n_ctx * n_seq_max
        params.n_seq_max = n_seq_max
        params.n_batch = params.n_ubatch = self.n_batch
        params.n_threads = params.n_threads_batch = self.n_threads
        # Measured on the full-size 4.5 Q4_K_M, 2 AVX2 cores: flash attention off decodes 8% and prefills 9%
        # faster (3.12 vs 2.88 tok/s, 10.6 vs 9.7 tok/s).
        params.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
        self.ctx = llama_cpp.llama_init_from_model(self.model, params)
        if not self.ctx:
            raise EngineError(f"cannot create a llama.cpp context of {n_seq_max} x {n_ctx} tokens")
        self.n_ctx = llama_cpp.llama_n_ctx_seq(self.ctx)
        self.slots = [SequenceSlot(i) for i in range(n_seq_max)]

    def close(self) -> None:
        if self.ctx:
            llama_cpp.llama_free(self.ctx)
            self.ctx = None
        if self.model:
            llama_cpp.llama_model_free(self.model)
            self.model = None

    def __del__(self) -> None:
        self.close()

    # ---- text -------------------------------------------------------------------------------------------

    def tokenize(self, text: str, *, special: bool = True) -> list[int]:
        data = text.encode()
        capacity = len(data) + 8
        out = (llama_cpp.llama_token * capacity)()
        n = llama_cpp.llama_tokenize(self.vocab, data, len(data), out, capacity, False, special)
        if n < 0:
            out = (llama_cpp.llama_token * -n)()
            n = llama_cpp.llama_tokenize(self.vocab, data, len(data), out, -n, False, special)
        return list(out[:n])

    def piece(self, token: int, *, special: bool = False) -> bytes:
        """The token's text; control tokens render empty unless `special`."""
        buf = ctypes.create_string_buffer(64)
        n = llama_cpp.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, special)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = llama_cpp.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, special)
        return buf.raw[:n]

    def is_end(self, token: int) -> bool:
        return bool(llama_cpp.llama_vocab_is_eog(self.vocab, token))

    def end_tokens(self) -> list[int]:
        if self._end_tokens is None:
            self._end_tokens = [t for t in range(llama_cpp.llama_vocab_n_tokens(self.vocab)) if self.is_end(t)]
        return self._end_tokens

    # ---- decoding ---------------------------------------------------------------------------------------

    def feed(self, items: list[object], embeddings: Mapping[object, np.ndarray],
             on_logits: Callable[[int, np.ndarray], None] | None = None, plan: PositionPlan | None = None,
             slot: int = 0) -> int:
        """Make sequence `slot`'s cache hold `items` (token ids, or keys into `embeddings` for image rows)
        followed by nothing else; returns how many positions had to be decoded. Logits of the last item are
        ready; with `on_logits`, the logits of every decoded position are handed over as (first position, rows).
        With `plan`, every item is decoded as an embedding row at the plan's positions (and so are the tokens
        `append_token` adds until the next feed)."""
        sequence = self.slots[slot]
        if len(items) >= self.n_ctx:
            self._grow(len(items))
            sequence = self.slots[slot]
        common = self.rewind(sequence, items, embeddings, plan)
        position = common
        while position < len(items):
            run = Run(sequence, items, position, self.run_end(sequence, items, position, self.n_batch),
                      on_logits is not None)
            self.decode([run])
            if on_logits is not None:
                n_vocab = llama_cpp.llama_vocab_n_tokens(self.vocab)
                rows = np.ctypeslib.as_array(llama_cpp.llama_get_logits(self.ctx),
                                             shape=(run.end - run.start, n_vocab))
                on_logits(run.start, rows.copy())
            position = run.end
        return len(items) - common

    def rewind(self, sequence: SequenceSlot, items: Sequence[object], embeddings: Mapping[object, np.ndarray],
               plan: PositionPlan | None = None) -> int:
        """Keep the longest prefix of `items` the sequence's cache holds (never the last item, whose logits
        must be fresh) and drop the rest; returns the prefix length. Only this sequence is touched."""
        if len(items) > self.n_ctx:
            raise EngineError(f"the prompt needs {len(items)} positions; a sequence holds {self.n_ctx}")
        sequence.embeddings, sequence.plan = embeddings, plan
        common = sequence.shared_prefix(items, min(len(sequence.history), len(items) - 1))
        memory = llama_cpp.llama_get_memory(self.ctx)
        if not llama_cpp.llama_memory_seq_rm(memory, sequence.seq_id, common, -1):
            # A recurrent state (Qwen3.5's linear-attention layers) cannot always be rewound to an earlier
            # position: this sequence starts over, the others keep theirs.
            if not llama_cpp.llama_memory_seq_rm(memory, sequence.seq_id, -1, -1):
                raise EngineError(f"llama.cpp cannot clear sequence {sequence.seq_id}")
            common = 0
        del sequence.history[common:]
        return common

    def reserve(self, positions: int) -> None:
        """Grow the context before a prompt and its answer need it, so it is not rebuilt mid-answer."""
        limit = llama_cpp.llama_model_n_ctx_train(self.model)
        if positions >= self.n_ctx and self.n_ctx < limit:
            self._grow(min(positions, limit - 1))

    def _grow(self, needed: int) -> None:
        """A larger context: only with one sequence (rebuilding would drop every other sequence's cache)."""
        limit = llama_cpp.llama_model_n_ctx_train(self.model)
        if needed >= limit:
            raise EngineError(f"the prompt needs {needed} positions; the model's context holds {limit}")
        if len(self.slots) > 1:
            raise EngineError(f"the prompt needs {needed} positions; a sequence holds {self.n_ctx}")
        size = self.n_ctx
        while size <= needed:
            size *= 2
        self._create_context(min(size, limit))

    def run_end(self, sequence: SequenceSlot, items: Sequence[object], start: int, limit: int) -> int:
        """The end of the longest run of same-kind items (text, or rows of one image piece) from `start`,
        at most `limit` long: a run is decoded as token ids or as embedding rows, never both."""
        is_text = isinstance(items[start], int)
        end = start
        while end < len(items) and end - start < limit and isinstance(items[end], int) == is_text \
                and (is_text or items[end][0] == items[start][0]):
            end += 1
        return end

    def decode(self, runs: Sequence[Run]) -> None:
        """Decode the runs (of any sequences, all token ids or all embedding rows, at most `n_batch` items)
        in one llama.cpp batch; afterwards each run's sequence samples from its newest item's logits."""
        as_embeddings = runs[0].as_embeddings
        if any(run.as_embeddings != as_embeddings for run in runs):
            raise ValueError("one batch decodes token ids or embedding rows, not both")
        n = sum(run.end - run.start for run in runs)
        batch = llama_cpp.llama_batch_init(n, self.n_embd if as_embeddings else 0, 1)
        own_pos = ctypes.cast(batch.pos, ctypes.c_void_p).value  # an address: the field object would follow changes
        try:
            i = 0
            for run in runs:
                for offset, item in enumerate(run.items[run.start:run.end]):
                    if not as_embeddings:
                        batch.token[i] = item
                    batch.pos[i] = run.start + offset
                    batch.n_seq_id[i] = 1
                    batch.seq_id[i][0] = run.slot.seq_id
                    batch.logits[i] = run.all_logits or run.start + offset == len(run.items) - 1
                    i += 1
            sections = None
            if as_embeddings:
                rows = np.concatenate([self._rows(run) for run in runs])
                ctypes.memmove(batch.embd, rows.ctypes.data, rows.nbytes)
                if self.mrope or runs[0].slot.plan is not None:
                    # Section-major: pos[j * n + i] is section j of row i.
                    sections = np.ascontiguousarray(np.concatenate([self._positions(run) for run in runs]).T,
                                                    dtype=np.int32)
                    batch.pos = sections.ctypes.data_as(ctypes.POINTER(llama_cpp.llama_pos))
            batch.n_tokens = n
            if on_compute_thread(llama_cpp.llama_decode, self.ctx, batch) != 0:
                raise EngineError("llama.cpp failed to decode")
        finally:
            batch.pos = ctypes.cast(own_pos, ctypes.POINTER(llama_cpp.llama_pos))  # llama_batch_free frees its own
            llama_cpp.llama_batch_free(batch)
        i = 0
        for run in runs:
            run.slot.history.extend(run.items[run.start:run.end])
            i += run.end - run.start
            run.slot.logits_index = i - 1

    def _rows(self, run: Run) -> np.ndarray:
        first = run.items[run.start]
        if isinstance(first, int):
            return np.asarray(run.slot.plan.token_rows(run.items[run.start:run.end]), dtype=np.float32)
        key, first_row = first
        return np.asarray(run.slot.embeddings[key][first_row:first_row + run.end - run.start], dtype=np.float32)

    def _positions(self, run: Run) -> np.ndarray:
        """[n, 4] position sections of the run's items."""
        if run.slot.plan is not None:
            return np.asarray(run.slot.plan.positions(run.items), dtype=np.int32)[run.start:run.end]
        sequential = np.zeros((run.end - run.start, 4), dtype=np.int32)
        sequential[:, :3] = np.arange(run.start, run.end, dtype=np.int32)[:, None]
        return sequential

    def sampler(self, sampling: Sampling) -> ctypes.c_void_p:
        chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
        if sampling.ignore_eos:
            ends = self.end_tokens()
            biases = (llama_cpp.llama_logit_bias * len(ends))(*((token, -float("inf")) for token in ends))
            llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_logit_bias(
                llama_cpp.llama_vocab_n_tokens(self.vocab), len(ends), biases))
        if sampling.repetition_penalty != 1.0:
            llama_cpp.llama_sampler_chain_add(
                chain, llama_cpp.llama_sampler_init_penalties(llama_cpp.llama_vocab_n_tokens(self.vocab), 64,
                                                              sampling.repetition_penalty, 0.0, 0.0))
        if sampling.temperature <= 0:
            llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_greedy())
            return chain
        if sampling.top_k > 0:
            llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_top_k(sampling.top_k))
        if sampling.top_p < 1.0:
            llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_top_p(sampling.top_p, 1))
        llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_temp(sampling.temperature))
        llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_dist(sampling.seed))
        return chain

    def sample(self, chain: ctypes.c_void_p, slot: int = 0) -> int:
        """A token from the newest logits of sequence `slot` (decoded in the last batch)."""
        return int(llama_cpp.llama_sampler_sample(chain, self.ctx, self.slots[slot].logits_index))

    def append_token(self, token: int, slot: int = 0) -> None:
        """Decode one generated token at the sequence's next position, with the plan of its last feed."""
        sequence = self.slots[slot]
        if len(sequence.history) + 1 >= self.n_ctx:
            # grows the context (one sequence only), decodes it all again
            self.feed(sequence.history + [token], sequence.embeddings, plan=sequence.plan, slot=slot)
            return
        self.decode([self.next_token_run(sequence, token)])

    @staticmethod
    def next_token_run(sequence: SequenceSlot, token: int) -> Run:
        """The run that decodes a generated token after the sequence's history."""
        return Run(sequence, sequence.history + [token], len(sequence.history), len(sequence.history) + 1)
