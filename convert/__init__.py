"""Checkpoint -> GGUF conversion for the MiniCPM-V families."""

from .errors import ConversionError
from .families import detect_family
from .pipeline import ConversionResult, convert_checkpoint
from .presets import Preset, load_preset, preset_names

__all__ = [
    "ConversionError",
    "ConversionResult",
    "Preset",
    "convert_checkpoint",
    "detect_family",
    "load_preset",
    "preset_names",
]
