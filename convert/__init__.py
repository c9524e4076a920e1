"""Checkpoint -> GGUF conversion for the MiniCPM-V families."""

from .errors import ConversionError
from .families import FAMILIES, Family, detect_family
from .pipeline import ConversionResult, convert_checkpoint
from .presets import Preset, load_preset, preset_names

__all__ = [
    "FAMILIES",
    "ConversionError",
    "ConversionResult",
    "Family",
    "Preset",
    "convert_checkpoint",
    "detect_family",
    "load_preset",
    "preset_names",
]
