"""A published Hugging Face checkpoint folder, read lazily: config files and memory-mapped safetensors shards.

Nothing here holds more than the rows being converted: tensors are opened with safetensors (mmap) and
sliced row-block by row-block, so peak memory follows the chunk size, not the model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from safetensors import SafetensorError, safe_open

from .errors import ConversionError

# Row blocks of about this many values are read, converted and quantized at a time.
CHUNK_VALUES = 16 << 20
_HUB_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken", "*.py"]


@dataclass(frozen=True)
class TensorRef:
    name: str
    shard: Path
    dtype: str
    shape: tuple[int, ...]


@dataclass
class Checkpoint:
    folder: Path
    config: dict[str, Any]
    tensors: dict[str, TensorRef]
    _handles: dict[Path, Any] = field(default_factory=dict, repr=False)

    def json_file(self, name: str) -> dict[str, Any] | None:
        path = self.folder / name
        if not path.is_file():
            return None
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConversionError(f"{path} is not valid JSON: {e}") from None

    def _handle(self, shard: Path) -> Any:
        if shard not in self._handles:
            self._handles[shard] = safe_open(str(shard), framework="pt")
        return self._handles[shard]

    def read(self, name: str, rows: slice | None = None) -> np.ndarray:
        """Tensor `name` (or a block of its rows) as float32."""
        ref = self.tensors[name]
        try:
            view = self._handle(ref.shard).get_slice(name)
            data = view[rows] if rows is not None else view[:]
        except SafetensorError as e:
            raise ConversionError(f"cannot read {name} from {ref.shard.name}: {e}") from None
        return data.float().numpy()

    def row_blocks(self, name: str) -> Iterator[np.ndarray]:
        """The tensor as consecutive float32 blocks of whole rows (the first axis), each about CHUNK_VALUES."""
        shape = self.tensors[name].shape
        row_values = int(np.prod(shape[1:])) if len(shape) > 1 else 1
        step = max(1, CHUNK_VALUES // max(1, row_values))
        if len(shape) < 2 or shape[0] <= step:
            yield self.read(name)
            return
        for start in range(0, shape[0], step):
            yield self.read(name, slice(start, min(start + step, shape[0])))

    def close(self) -> None:
        self._handles.clear()


def _shard_tensors(shard: Path) -> dict[str, TensorRef]:
    if not shard.is_file():
        raise ConversionError(f"missing shard {shard.name} in {shard.parent}")
    try:
        with safe_open(str(shard), framework="pt") as handle:
            refs = {}
            for name in handle.keys():
                view = handle.get_slice(name)
                refs[name] = TensorRef(name, shard, view.get_dtype(), tuple(view.get_shape()))
            return refs
    except SafetensorError as e:
        raise ConversionError(f"{shard.name} is not a readable safetensors file (truncated?): {e}") from None


def open_checkpoint(folder: Path) -> Checkpoint:
    """Open a checkpoint folder: config.json plus model.safetensors or the shards its index names."""
    if not folder.is_dir():
        raise ConversionError(f"{folder} is not a folder")
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise ConversionError(f"{folder} has no config.json; is it a Hugging Face checkpoint?")
    checkpoint = Checkpoint(folder, {}, {})
    checkpoint.config = checkpoint.json_file("config.json") or {}

    index = checkpoint.json_file("model.safetensors.index.json")
    if index is not None:
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ConversionError(f"{folder / 'model.safetensors.index.json'} has no weight_map")
        shards = sorted(set(weight_map.values()))
    else:
        shards = sorted(p.name for p in folder.glob("*.safetensors"))
        if not shards:
            raise ConversionError(f"{folder} holds no *.safetensors weights")
        weight_map = None

    for shard_name in shards:
        checkpoint.tensors.update(_shard_tensors(folder / shard_name))
    if weight_map is not None:
        missing = sorted(set(weight_map) - set(checkpoint.tensors))
        if missing:
            raise ConversionError(f"the index names {len(missing)} tensors its shards lack, e.g. {missing[0]}")
    return checkpoint


def resolve_source(source: str) -> Path:
    """A local folder as is; otherwise a hub repo id, downloaded with huggingface_hub."""
    path = Path(source).expanduser()
    if path.exists():
        return path
    if source.count("/") != 1 or source.startswith((".", "/", "~")):
        raise ConversionError(f"{source} is neither a local folder nor a hub repo id (owner/name)")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id=source, allow_patterns=_HUB_FILES))
    except Exception as e:  # noqa: BLE001 - any hub failure (offline, 404, auth) becomes one line
        raise ConversionError(f"cannot download {source} from the hub: {type(e).__name__}: {e}") from None
