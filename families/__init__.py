"""One place per MiniCPM-V family: `registry` holds the types and the look-ups; each module beside it
registers one family group. Adding a family is adding a module and importing it here."""

# Each module registers its families; the order is the order of `families()`.
from . import resampler  # noqa: F401, I001
from . import minicpmv4_6  # noqa: F401
from .registry import (FAMILY_KEY, Family, Layout, PieceFrame, UnknownFamily, families, from_config, from_gguf,
                       get, supported_list)

__all__ = ["FAMILY_KEY", "Family", "Layout", "PieceFrame", "UnknownFamily", "families", "from_config", "from_gguf",
           "get", "supported_list"]
