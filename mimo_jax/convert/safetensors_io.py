"""Lazy safetensors reading and streaming writing, sharded, with numpy arrays.

The format is an 8-byte little-endian header length, a JSON header mapping each tensor name to
its dtype, shape and byte range, then the raw bytes. Reading memory-maps each file and hands out
one tensor at a time, so a 300 GB checkpoint is never held in memory; writing streams tensors to
disk one by one. bfloat16 and float8 come from `ml_dtypes` (numpy has neither).
"""

from __future__ import annotations

import dataclasses
import json
import math
import mmap
import os
import struct
from typing import Callable, Iterable, Mapping

import ml_dtypes
import numpy as np

from mimo_jax.convert.errors import CheckpointError

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"

DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
DTYPE_NAMES: dict[np.dtype, str] = {v: k for k, v in DTYPES.items()}


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: its file, dtype name (e.g. "BF16"), shape and byte range."""

    path: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


def _read_header(path: str) -> tuple[dict[str, TensorInfo], int]:
    """Parses one file's header. Returns its tensors and the offset where the data starts."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise CheckpointError(f"{path}: too short to be a safetensors file ({size} bytes)")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > size - 8:
            raise CheckpointError(f"{path}: header length {header_len} exceeds the file size {size}")
        try:
            header = json.loads(f.read(header_len))
        except json.JSONDecodeError as err:
            raise CheckpointError(f"{path}: the safetensors header is not valid JSON ({err})") from err
    data_start = 8 + header_len
    tensors = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        begin, end = entry["data_offsets"]
        info = TensorInfo(path, entry["dtype"], tuple(int(d) for d in entry["shape"]),
                          data_start + begin, data_start + end)
        if info.end > size:
            raise CheckpointError(f"tensor {name!r} in {path}: its bytes [{info.begin}, {info.end}) "
                                  f"run past the end of the file ({size} bytes)")
        dtype = DTYPES.get(info.dtype)
        if dtype is not None and (info.end - info.begin) != math.prod(info.shape) * dtype.itemsize:
            raise CheckpointError(
                f"tensor {name!r} in {path}: shape {info.shape} of {info.dtype} needs "
                f"{math.prod(info.shape) * dtype.itemsize} bytes but the header gives "
                f"{info.end - info.begin}")
        tensors[name] = info
    return tensors, data_start


class CheckpointReader:
    """All tensors of a (possibly sharded) safetensors checkpoint directory, read lazily.

    Files are memory-mapped; `get` returns a read-only view into the map, so callers copy what
    they keep. With `memory_map=False` each `get` reads its tensor into a buffer of its own
    instead, which is freed with the array: a converter streaming every tensor of a large
    checkpoint then holds one at a time, where the map's pages, once touched, would stay counted
    in its resident memory. Every name passed to `get` is recorded, so a loader can report the
    tensors it never used.
    """

    def __init__(self, directory: str, *, memory_map: bool = True):
        self.directory = directory
        self._memory_map = memory_map
        files = self._files(directory)
        self._tensors: dict[str, TensorInfo] = {}
        for path in files:
            tensors, _ = _read_header(path)
            for name, info in tensors.items():
                if name in self._tensors:
                    raise CheckpointError(f"tensor {name!r} appears in both "
                                          f"{self._tensors[name].path} and {path}")
                self._tensors[name] = info
        self._maps: dict[str, mmap.mmap] = {}
        self.used: set[str] = set()

    @staticmethod
    def _files(directory: str) -> list[str]:
        index = os.path.join(directory, INDEX_FILE)
        if os.path.exists(index):
            with open(index) as f:
                weight_map = json.load(f).get("weight_map")
            if not isinstance(weight_map, dict):
                raise CheckpointError(f"{index} has no 'weight_map' object")
            files = sorted(set(weight_map.values()))
            missing = [p for p in files if not os.path.exists(os.path.join(directory, p))]
            if missing:
                raise CheckpointError(f"{index} names shard {missing[0]!r}, which is not in "
                                      f"{directory}")
            return [os.path.join(directory, p) for p in files]
        single = os.path.join(directory, SINGLE_FILE)
        if os.path.exists(single):
            return [single]
        files = sorted(p for p in os.listdir(directory) if p.endswith(".safetensors"))
        if not files:
            raise CheckpointError(f"no *.safetensors files in {directory}")
        return [os.path.join(directory, p) for p in files]

    def names(self) -> list[str]:
        return sorted(self._tensors)

    def __contains__(self, name: str) -> bool:
        return name in self._tensors

    def info(self, name: str) -> TensorInfo:
        if name not in self._tensors:
            raise CheckpointError(f"missing tensor {name!r} in {self.directory}")
        return self._tensors[name]

    def get(self, name: str) -> np.ndarray:
        """The tensor as a read-only numpy view in its stored dtype."""
        info = self.info(name)
        dtype = DTYPES.get(info.dtype)
        if dtype is None:
            raise CheckpointError(f"tensor {name!r} has dtype {info.dtype!r}, which this reader "
                                  f"does not know (known: {sorted(DTYPES)})")
        self.used.add(name)
        count = math.prod(info.shape)
        if not self._memory_map:
            with open(info.path, "rb") as f:
                f.seek(info.begin)
                data = f.read(count * dtype.itemsize)
            return np.frombuffer(data, dtype=dtype, count=count).reshape(info.shape)
        if info.path not in self._maps:
            with open(info.path, "rb") as f:
                self._maps[info.path] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        flat = np.frombuffer(self._maps[info.path], dtype=dtype, count=count, offset=info.begin)
        return flat.reshape(info.shape)

    def unused(self) -> list[str]:
        return sorted(set(self._tensors) - self.used)


@dataclasses.dataclass(frozen=True)
class PendingTensor:
    """A tensor to write: its name, shape and dtype up front, its values on demand."""

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype
    produce: Callable[[], np.ndarray]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def _shard_plan(tensors: list[PendingTensor], max_shard_bytes: int) -> list[list[PendingTensor]]:
    shards: list[list[PendingTensor]] = [[]]
    size = 0
    for tensor in tensors:
        if shards[-1] and size + tensor.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(tensor)
        size += tensor.nbytes
    return shards


def _write_file(path: str, tensors: list[PendingTensor], metadata: Mapping[str, str]) -> None:
    header: dict = {"__metadata__": dict(metadata)}
    offset = 0
    for tensor in tensors:
        if tensor.dtype not in DTYPE_NAMES:
            raise CheckpointError(f"tensor {tensor.name!r}: dtype {tensor.dtype} has no "
                                  "safetensors name")
        header[tensor.name] = {"dtype": DTYPE_NAMES[tensor.dtype], "shape": list(tensor.shape),
                               "data_offsets": [offset, offset + tensor.nbytes]}
        offset += tensor.nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data section starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(encoded)))
        f.write(encoded)
        for tensor in tensors:
            values = np.ascontiguousarray(tensor.produce(), dtype=tensor.dtype)
            if values.shape != tensor.shape:
                raise CheckpointError(f"tensor {tensor.name!r}: produced shape {values.shape}, "
                                      f"planned {tensor.shape}")
            f.write(values.tobytes())


def write_checkpoint(directory: str, tensors: Iterable[PendingTensor],
                     max_shard_bytes: int = 5 * 2**30) -> list[str]:
    """Writes tensors as `model.safetensors`, or as `model-0000i-of-0000n.safetensors` shards plus
    `model.safetensors.index.json` when they exceed `max_shard_bytes`. Returns the file names."""
    tensors = list(tensors)
    seen = set()
    for tensor in tensors:
        if tensor.name in seen:
            raise CheckpointError(f"tensor {tensor.name!r} would be written twice")
        seen.add(tensor.name)
    os.makedirs(directory, exist_ok=True)
    for stale in os.listdir(directory):
        # A previous export with a different sharding would otherwise shadow this one.
        if stale == INDEX_FILE or (stale.startswith("model") and stale.endswith(".safetensors")):
            os.remove(os.path.join(directory, stale))
    shards = _shard_plan(tensors, max_shard_bytes)
    metadata = {"format": "pt"}  # transformers expects the torch layout marker
    if len(shards) == 1:
        _write_file(os.path.join(directory, SINGLE_FILE), shards[0], metadata)
        return [SINGLE_FILE]
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for name, shard in zip(names, shards):
        _write_file(os.path.join(directory, name), shard, metadata)
        weight_map.update({t.name: name for t in shard})
    index = {"metadata": {"total_size": sum(t.nbytes for t in tensors)},
             "weight_map": dict(sorted(weight_map.items()))}
    with open(os.path.join(directory, INDEX_FILE), "w") as f:
        json.dump(index, f, indent=2)
    return names
