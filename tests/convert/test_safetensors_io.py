"""The lazy safetensors reader and streaming writer, against the `safetensors` library."""

import json
import os

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from mimo_jax.convert.errors import CheckpointError
from mimo_jax.convert.safetensors_io import (INDEX_FILE, CheckpointReader, PendingTensor,
                                             write_checkpoint)


def _pending(tensors):
    return [PendingTensor(n, v.shape, v.dtype, lambda v=v: v) for n, v in tensors.items()]


def test_round_trip_all_dtypes_sharded(tmp_path):
    rng = np.random.default_rng(0)
    tensors = {
        "a.f32": rng.normal(size=(5, 7)).astype(np.float32),
        "b.bf16": rng.normal(size=(33,)).astype(ml_dtypes.bfloat16),
        "c.fp8": rng.normal(size=(4, 3, 2)).astype(ml_dtypes.float8_e4m3fn),
        "d.i32": rng.integers(-5, 5, (6,)).astype(np.int32),
        "e.f16": rng.normal(size=(2, 2)).astype(np.float16),
    }
    files = write_checkpoint(str(tmp_path), _pending(tensors), max_shard_bytes=100)
    assert len(files) > 1
    with open(tmp_path / INDEX_FILE) as f:
        index = json.load(f)
    assert sorted(index["weight_map"]) == sorted(tensors)
    assert index["metadata"]["total_size"] == sum(v.nbytes for v in tensors.values())
    reader = CheckpointReader(str(tmp_path))
    assert reader.names() == sorted(tensors)
    for name, value in tensors.items():
        got = reader.get(name)
        assert got.dtype == value.dtype and got.shape == value.shape
        np.testing.assert_array_equal(got.view(np.uint8), value.view(np.uint8))
    assert reader.unused() == []


def test_interoperates_with_safetensors_library(tmp_path):
    rng = np.random.default_rng(1)
    ours = {"x": rng.normal(size=(3, 4)).astype(np.float32), "y": np.arange(5, dtype=np.int64)}
    write_checkpoint(str(tmp_path / "ours"), _pending(ours))
    theirs = load_file(str(tmp_path / "ours" / "model.safetensors"))
    for name, value in ours.items():
        np.testing.assert_array_equal(theirs[name], value)
    os.makedirs(tmp_path / "theirs")
    save_file(ours, str(tmp_path / "theirs" / "model.safetensors"))
    reader = CheckpointReader(str(tmp_path / "theirs"))
    for name, value in ours.items():
        np.testing.assert_array_equal(reader.get(name), value)


def test_rewrite_replaces_stale_shards(tmp_path):
    big = {f"t{i}": np.full((10,), i, np.float32) for i in range(4)}
    write_checkpoint(str(tmp_path), _pending(big), max_shard_bytes=50)
    write_checkpoint(str(tmp_path), _pending({"only": np.ones(3, np.float32)}))
    assert sorted(os.listdir(tmp_path)) == ["model.safetensors"]
    assert CheckpointReader(str(tmp_path)).names() == ["only"]


def test_truncated_file_and_missing_tensor_errors(tmp_path):
    write_checkpoint(str(tmp_path), _pending({"w": np.ones((64, 64), np.float32)}))
    path = tmp_path / "model.safetensors"
    reader = CheckpointReader(str(tmp_path))
    with pytest.raises(CheckpointError, match="missing tensor 'nope'"):
        reader.get("nope")
    data = path.read_bytes()
    path.write_bytes(data[:-100])
    with pytest.raises(CheckpointError, match=r"tensor 'w' .* run past the end"):
        CheckpointReader(str(tmp_path))
