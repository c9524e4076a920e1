"""Reading a model's hyper-parameters from config.json, shared by every architecture's converter."""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from .errors import ConversionError

Shape = tuple[int, ...]
Transform = Callable[[np.ndarray], np.ndarray]


def require(config: dict[str, Any], key: str) -> Any:
    if key not in config:
        raise ConversionError(f"config.json lacks the key {key!r}")
    return config[key]


def head_dim(config: dict[str, Any]) -> int:
    return int(config.get("head_dim") or require(config, "hidden_size") // require(config, "num_attention_heads"))


def rope_parameter(config: dict[str, Any], key: str, default: float) -> float:
    """A rope setting from the config's top level, or from `rope_parameters` where transformers 5 keeps it."""
    return float(config.get(key, (config.get("rope_parameters") or {}).get(key, default)))
