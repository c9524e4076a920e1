"""A published Hugging Face checkpoint folder, read lazily: config files and memory-mapped safetensors shards.

Shards are memory-mapped and read one row block at a time; once a block is converted its pages are
released with madvise(MADV_DONTNEED). Without that, every page read stays in the process's resident set
(safetensors' own mmap offers no way to drop them) and peak RSS would grow to the size of the shards.
The safetensors layout itself is tiny: an 8-byte header length, a JSON header of dtype, shape and data
offsets per tensor, then the raw data.
"""

from __future__ import annotations

import json
import mmap
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from .errors import ConversionError
from .ggml_quant import half_to_float32

# Row blocks of about this many values are read, converted and quantized at a time.
CHUNK_VALUES = 16 << 20
_HUB_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken", "*.py"]
_NUMPY_DTYPES = {"BF16": np.uint16, "F16": np.float16, "F32": np.float32, "F64": np.float64,
                 "I32": np.int32, "I64": np.int64, "I16": np.int16, "I8": np.int8, "U8": np.uint8}


@dataclass(frozen=True)
class TensorRef:
    name: str
    shard: Path
    dtype: str
    shape: tuple[int, ...]
    offset: int  # absolute byte offset of the data in the shard
    nbytes: int


@dataclass
class Checkpoint:
    folder: Path
    config: dict[str, Any]
    tensors: dict[str, TensorRef]
    _maps: dict[Path, mmap.mmap] = field(default_factory=dict, repr=False)

    def json_file(self, name: str) -> dict[str, Any] | None:
        path = self.folder / name
        if not path.is_file():
            return None
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConversionError(f"{path} is not valid JSON: {e}") from None

    def _map(self, shard: Path) -> mmap.mmap:
        if shard not in self._maps:
            with open(shard, "rb") as f:
                self._maps[shard] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        return self._maps[shard]

    def read(self, name: str, rows: slice | None = None, *, as_stored: bool = False) -> np.ndarray:
        """Tensor `name` (or a block of its rows) as float32, or `as_stored` in its own dtype (packed int4
        words must not pass through float32)."""
        ref = self.tensors[name]
        dtype = np.dtype(_NUMPY_DTYPES[ref.dtype])
        row_values = int(np.prod(ref.shape[1:])) if len(ref.shape) > 1 else 1
        first, last = (0, ref.shape[0] if ref.shape else 1) if rows is None else (rows.start, rows.stop)
        start = ref.offset + first * row_values * dtype.itemsize
        count = (last - first) * row_values
        mapped = self._map(ref.shard)
        view = np.frombuffer(mapped, dtype=dtype, count=count, offset=start)
        if as_stored:
            data = view.copy()
        elif ref.dtype in ("BF16", "F16"):
            data = half_to_float32(view, ref.dtype)  # straight out of the map, no intermediate copy
        else:
            data = view.astype(np.float32)
        del view
        aligned = start - start % mmap.PAGESIZE
        mapped.madvise(mmap.MADV_DONTNEED, aligned, start + count * dtype.itemsize - aligned)
        return data.reshape((last - first, *ref.shape[1:]) if ref.shape else ())

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
        for mapped in self._maps.values():
            mapped.close()
        self._maps.clear()


def _shard_tensors(shard: Path) -> dict[str, TensorRef]:
    if not shard.is_file():
        raise ConversionError(f"missing shard {shard.name} in {shard.parent}")
    size = shard.stat().st_size
    try:
        with open(shard, "rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            if header_len > size - 8:
                raise ValueError("header runs past the end of the file")
            header = json.loads(f.read(header_len))
        refs = {}
        for name, info in header.items():
            if name == "__metadata__":
                continue
            begin, end = info["data_offsets"]
            if info["dtype"] not in _NUMPY_DTYPES:
                raise ValueError(f"{name} has unsupported dtype {info['dtype']}")
            if 8 + header_len + end > size:
                raise ValueError(f"{name} runs past the end of the file")
            refs[name] = TensorRef(name, shard, info["dtype"], tuple(info["shape"]), 8 + header_len + begin,
                                   end - begin)
        return refs
    except (ValueError, KeyError, TypeError, struct.error, UnicodeDecodeError) as e:
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
