"""Synthetic checkpoint factory: random-weight Hugging Face folders in each MiniCPM-V family's published layout.

`make_checkpoint(key, out_dir, size="tiny"|"full", seed=0)` writes one (file names, config keys, tensor
names, bf16 dtype; only sizes shrink for "tiny"). The keys are `synthetic_keys()`: the registry's families
(`minicpmv_edge.families`) that declare a `CheckpointSpec` as `Family.synthetic`, and their variants
(MiniCPM-V 4.6-Thinking). Everything per family is that spec, in the family's registry module; the code here
is generic, with one writer per `CheckpointSpec.builder` (`factory.BUILDERS`). `plan_tensors` lists
(name, shape) without writing data (resampler layout only: MiniCPM-V 4.6 is built by transformers' own
MiniCPMV4_6ForConditionalGeneration). torch (and transformers) are imported only while a checkpoint is
written, never at import. What was verified against published files and what is assumed:
families/PUBLISHED.md.
"""

from .factory import build_tokenizer, checkpoint_spec, dims, make_checkpoint, plan_tensors, synthetic_keys
from .int4 import make_int4_checkpoint

__all__ = ["build_tokenizer", "checkpoint_spec", "dims", "make_checkpoint", "make_int4_checkpoint", "plan_tensors",
           "synthetic_keys"]
