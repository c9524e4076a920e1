"""The one error type the converter raises for bad input; the CLI prints it as a single line."""


class ConversionError(Exception):
    """Bad or unsupported input: a missing file, an unknown family, a truncated shard, no disk space."""
