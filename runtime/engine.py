"""llama.cpp's decoder through llama-cpp-python's low-level API: a model, one context whose KV cache holds
the conversation so far, and decoding of token ids and image embeddings at consecutive positions.

The KV cache is reused across calls: `feed` drops only what no longer matches the new prompt, so a second
turn re-encodes neither the history's text nor its images."""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import llama_cpp
import numpy as np


class EngineError(RuntimeError):
    """The language model could not be loaded or the prompt does not fit the context."""


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    seed: int = 0


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


class Engine:
    """A llama.cpp model and context; `history` mirrors what the KV cache holds: token ids, and
    (piece key, row) pairs for positions filled by a row of an image piece's embeddings."""

    def __init__(self, path: Path, *, n_ctx: int, n_threads: int, n_batch: int = 512, repack: bool = False):
        # Everything close() reads exists before anything can raise, so cleanup after a failed load is silent.
        self.model = None
        self.ctx = None
        self._token_batch = None
        init_backend()
        params = llama_cpp.llama_model_default_params()
        params.use_mmap = True
        # Weight repacking costs load time and a second copy of the weights for no speed on AVX2 (measured).
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
        self._embeddings: dict[object, np.ndarray] = {}
        self.history: list[object] = []
        self._create_context(n_ctx)

    def _create_context(self, n_ctx: int) -> None:
        if self.ctx:
            llama_cpp.llama_free(self.ctx)
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = n_ctx
        params.n_batch = params.n_ubatch = self.n_batch
        params.n_threads = params.n_threads_batch = self.n_threads
        # Measured on the full-size 4.5 Q4_K_M, 2 AVX2 cores: flash attention off decodes 8% and prefills 9%
        # faster (3.12 vs 2.88 tok/s, 10.6 vs 9.7 tok/s).
        params.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
        self.ctx = llama_cpp.llama_init_from_model(self.model, params)
        if not self.ctx:
            raise EngineError(f"cannot create a llama.cpp context of {n_ctx} tokens")
        self.n_ctx = llama_cpp.llama_n_ctx(self.ctx)
        self.history = []

    def close(self) -> None:
        if self._token_batch is not None:
            llama_cpp.llama_batch_free(self._token_batch)
            self._token_batch = None
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

    # ---- decoding ---------------------------------------------------------------------------------------

    def feed(self, items: list[object], embeddings: dict[object, np.ndarray],
             on_logits: Callable[[int, np.ndarray], None] | None = None) -> int:
        """Make the KV cache hold `items` (token ids, or keys into `embeddings` for image rows) followed by
        nothing else; returns how many positions had to be decoded. Logits of the last item are ready; with
        `on_logits`, the logits of every decoded position are handed over as (first position, rows)."""
        self._embeddings = embeddings
        needed = len(items)
        if needed >= self.n_ctx:
            self._grow(needed)
        common = 0
        limit = min(len(self.history), needed - 1)  # always re-decode the last item to get fresh logits
        while common < limit and self.history[common] == items[common]:
            common += 1
        memory = llama_cpp.llama_get_memory(self.ctx)
        if not llama_cpp.llama_memory_seq_rm(memory, 0, common, -1):
            # A recurrent state (Qwen3.5's linear-attention layers) cannot be rewound to an earlier position.
            llama_cpp.llama_memory_clear(memory, True)
            common = 0
        self.history = list(items[:common])
        position = common
        while position < needed:
            start, position = position, self._decode_run(items, position, embeddings, on_logits is not None)
            if on_logits is not None:
                n_vocab = llama_cpp.llama_vocab_n_tokens(self.vocab)
                rows = np.ctypeslib.as_array(llama_cpp.llama_get_logits(self.ctx), shape=(position - start, n_vocab))
                on_logits(start, rows.copy())
        return needed - common

    def reserve(self, positions: int) -> None:
        """Grow the context before a prompt and its answer need it, so it is not rebuilt mid-answer."""
        limit = llama_cpp.llama_model_n_ctx_train(self.model)
        if positions >= self.n_ctx and self.n_ctx < limit:
            self._grow(min(positions, limit - 1))

    def _grow(self, needed: int) -> None:
        limit = llama_cpp.llama_model_n_ctx_train(self.model)
        if needed >= limit:
            raise EngineError(f"the prompt needs {needed} positions; the model's context holds {limit}")
        size = self.n_ctx
        while size <= needed:
            size *= 2
        self._create_context(min(size, limit))

    def _decode_run(self, items: list[object], start: int, embeddings: dict[object, np.ndarray],
                    all_logits: bool = False) -> int:
        """Decode the longest run of same-kind items (text or rows of one image piece) from `start`."""
        is_text = isinstance(items[start], int)
        end = start
        while end < len(items) and end - start < self.n_batch and isinstance(items[end], int) == is_text \
                and (is_text or items[end][0] == items[start][0]):
            end += 1
        n = end - start
        batch = llama_cpp.llama_batch_init(n, 0 if is_text else self.n_embd, 1)
        own_pos = ctypes.cast(batch.pos, ctypes.c_void_p).value  # an address: the field object would follow changes
        try:
            for i, item in enumerate(items[start:end]):
                if is_text:
                    batch.token[i] = item
                batch.pos[i] = start + i
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = 0
                batch.logits[i] = all_logits or (end == len(items) and i == n - 1)
            if not is_text:
                key, first_row = items[start]
                rows = np.ascontiguousarray(embeddings[key][first_row:first_row + n], dtype=np.float32)
                ctypes.memmove(batch.embd, rows.ctypes.data, rows.nbytes)
                if self.mrope:
                    # Section-major: pos[j * n + i] is section j of row i.
                    sections = np.zeros((4, n), dtype=np.int32)
                    sections[:3] = np.arange(start, end, dtype=np.int32)
                    batch.pos = sections.ctypes.data_as(ctypes.POINTER(llama_cpp.llama_pos))
            batch.n_tokens = n
            if llama_cpp.llama_decode(self.ctx, batch) != 0:
                raise EngineError("llama.cpp failed to decode the prompt")
        finally:
            batch.pos = ctypes.cast(own_pos, ctypes.POINTER(llama_cpp.llama_pos))  # llama_batch_free frees its own
            llama_cpp.llama_batch_free(batch)
        self.history.extend(items[start:end])
        return end

    def sampler(self, sampling: Sampling) -> ctypes.c_void_p:
        chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
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

    def sample(self, chain: ctypes.c_void_p) -> int:
        return int(llama_cpp.llama_sampler_sample(chain, self.ctx, -1))

    def append_token(self, token: int) -> None:
        """Decode one generated token at the next position (the hot loop: no prefix search, one reused batch)."""
        if len(self.history) + 1 >= self.n_ctx:
            self.feed(self.history + [token], self._embeddings)  # grows the context, decodes it all again
            return
        if self._token_batch is None:
            self._token_batch = llama_cpp.llama_batch_init(1, 0, 1)
        batch = self._token_batch
        batch.token[0], batch.pos[0], batch.n_seq_id[0], batch.logits[0] = token, len(self.history), 1, True
        batch.seq_id[0][0] = 0
        batch.n_tokens = 1
        if llama_cpp.llama_decode(self.ctx, batch) != 0:
            raise EngineError("llama.cpp failed to decode a generated token")
        self.history.append(token)
