"""Synthetic checkpoint factory for the MiniCPM-V / MiniCPM-o "resampler" families and MiniCPM-V 4.6.

`make_checkpoint(family, out_dir, size="tiny"|"full", seed=0)` writes a random-weight Hugging
Face folder in the family's published layout (file names, config keys, tensor names, bf16
dtype); only sizes shrink for "tiny". `plan_tensors` lists (name, shape) without writing data.
`FAMILIES` are the resampler families; `MERGER_FAMILIES` (MiniCPM-V 4.6 / 4.6-Thinking) go through
the same `make_checkpoint` but are built by transformers' own MiniCPMV4_6ForConditionalGeneration
(torch/transformers imported lazily, only on that path; `plan_tensors`/`dims` do not cover them).
What was verified against published files and what is assumed: PUBLISHED.md beside this file.
"""

from .factory import dims, make_checkpoint, plan_tensors
from .families import FAMILIES, get_family
from .int4 import make_int4_checkpoint
from .minicpmv4_6 import MERGER_FAMILIES
from .tokenizer import build_tokenizer

__all__ = ["FAMILIES", "MERGER_FAMILIES", "make_checkpoint", "make_int4_checkpoint", "plan_tensors", "dims",
           "get_family", "build_tokenizer"]
