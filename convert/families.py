"""The converter's view of the family registry (`minicpmv_edge.families`): detection with the converter's
error type, and where a checkpoint keeps its language model's hyper-parameters."""

from __future__ import annotations

from typing import Any

from minicpmv_edge.families import Family, UnknownFamily, from_config

from .errors import ConversionError


def detect_family(config: dict[str, Any]) -> Family:
    """The family of a checkpoint from its config.json `architectures` and `version`."""
    try:
        return from_config(config)
    except UnknownFamily as e:
        raise ConversionError(str(e)) from None


def llm_config(family: Family, config: dict[str, Any]) -> dict[str, Any]:
    """The language model's hyper-parameters: the top of config.json, or its `text_config` (4.6)."""
    key = family.layout.text_config
    if key is None:
        return config
    sub = config.get(key)
    if not isinstance(sub, dict):
        raise ConversionError(f"config.json lacks the key {key!r}")
    return sub
