"""One place per MiniCPM-V family: `registry` holds the types and the look-ups; each module beside it
registers one family group, with everything that differs per family, including its synthetic checkpoint
(`specs.CheckpointSpec`) and its test reference (`specs.ReferenceHints`). Adding a family is adding a module
and importing it here."""

# Each module registers its families; the order is the order of `families()`.
from . import resampler  # noqa: F401, I001
from . import minicpmv4_6  # noqa: F401
from . import minicpm_ocr  # noqa: F401
from . import minicpmv4_7  # noqa: F401
from .registry import (FAMILY_KEY, Family, Layout, PieceFrame, UnknownFamily, families, from_config, from_gguf,
                       get, supported_list)
from .specs import CheckpointSpec, ReferenceHints

__all__ = ["FAMILY_KEY", "CheckpointSpec", "Family", "Layout", "PieceFrame", "ReferenceHints", "UnknownFamily",
           "families", "from_config", "from_gguf", "get", "supported_list"]
