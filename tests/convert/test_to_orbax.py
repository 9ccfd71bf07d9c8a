"""`python -m mimo_jax.convert.to_orbax`: a Hugging Face checkpoint streamed into a params export
that loads exactly as `hf.load` reads the checkpoint, restores sharded, and converts with host
memory bounded by a tensor rather than the model."""

import dataclasses
import json
import pathlib
import subprocess
import sys

import chex
import jax
import numpy as np
import pytest
from flax import traverse_util

from mimo_jax.config import replace_model
from mimo_jax.convert import hf
from mimo_jax.convert.errors import CheckpointError
from mimo_jax.convert.orbax_export import CHUNK_BYTES, chunk_shape, stream_to_export
from mimo_jax.data.tokenizer import train_bpe
from mimo_jax.loading import load_checkpoint
from mimo_jax.parallel import mesh_config_from_dict
from mimo_jax.train import init_from, partition
from mimo_jax.train.checkpoint import load_exported

REPO = pathlib.Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("fp8", [False, True], ids=["float32", "fp8"])
def test_export_holds_what_hf_load_reads(tiny_config, tiny_params, tmp_path, fp8):
    """float32 tensors (experts one per tensor) or the released FP8 layout (dequantised on the
    way): the export's parameters equal `hf.load`'s, bit for bit, scanned and not."""
    source = tmp_path / "hf"
    hf.save(tiny_config, tiny_params, str(source), max_shard_bytes=200_000,
            fp8_block=(16, 16) if fp8 else None)
    (source / "tokenizer.json").write_text("{}")
    for scan in (True, False):
        config, out = stream_to_export(source, tmp_path / f"export_{scan}", scan_layers=scan)
        assert config.scan_layers == scan
        saved_config, params = load_exported(out)
        assert saved_config == config
        _, expected = hf.load(str(source), scan_layers=scan)
        chex.assert_trees_all_equal(jax.device_get(params), jax.device_get(expected))
        assert (out / "tokenizer.json").read_text() == "{}"
    assert not list(tmp_path.glob("*.partial"))


def _assert_placed(params, shardings, expected):
    """Each array in its sharding, each shard holding its slice of `expected`."""
    flat, want = traverse_util.flatten_dict(params), traverse_util.flatten_dict(expected)
    placements = traverse_util.flatten_dict(shardings)
    split = 0
    for path, array in flat.items():
        assert array.sharding == placements[path], path
        for shard in array.addressable_shards:
            np.testing.assert_array_equal(shard.data, np.asarray(want[path])[shard.index])
        split += not array.sharding.is_fully_replicated
    assert split > 0  # some parameters really are split


def test_training_and_decoding_restore_the_export_into_their_shardings(tiny_config,
                                                                       tiny_params, tmp_path):
    """`init_from` (training) and `load_checkpoint` with a mesh (decoding) place each parameter
    with its sharding on 8 devices (FSDP x expert) as it is read."""
    source = tmp_path / "hf"
    hf.save(tiny_config, tiny_params, str(source))
    train_bpe(["def add(x, y):\n    return x + y\n"] * 20, vocab_size=300,
              max_bytes=10_000).save(source / "tokenizer.json")
    _, out = stream_to_export(source, tmp_path / "export")
    _, expected = hf.load(str(source))
    parallelism = partition.make_parallelism(
        mesh_config_from_dict({"ici": "fsdp=2,expert=4", "dcn": "data=1",
                               "rules": "fsdp_ep_cp"}), 8)
    _, shardings = parallelism.param_shardings(hf.MiMoV2Flash(tiny_config))
    params = init_from.load_params(init_from.locate(out, tiny_config), tiny_config,
                                   shardings=shardings)
    _assert_placed(params, shardings, expected)
    model, params, tokenizer = load_checkpoint(out, parallelism)
    _, shardings = parallelism.param_shardings(model)
    _assert_placed(params, shardings, expected)
    assert tokenizer.source == str(out / "tokenizer.json")


def test_chunks_are_one_tensor_and_bounded():
    assert chunk_shape((6, 4, 64, 32), 2, 4) == (1, 1, 64, 32)
    big = chunk_shape((47, 256, 4096, 2048), 2, 2)
    assert big[:2] == (1, 1) and np.prod(big) * 2 <= CHUNK_BYTES


def test_bad_input_is_named_and_leaves_nothing(tiny_config, tiny_params, tmp_path,
                                               read_all, write_all):
    with pytest.raises(CheckpointError, match=r"is not a Hugging Face checkpoint directory"):
        stream_to_export(tmp_path / "missing", tmp_path / "out")
    source = tmp_path / "hf"
    hf.save(tiny_config, tiny_params, str(source))
    (tmp_path / "taken").mkdir()
    with pytest.raises(CheckpointError, match=r"already exists"):
        stream_to_export(source, tmp_path / "taken")
    extra = tmp_path / "extra"
    tensors = read_all(source)
    tensors["model.layers.0.unknown.weight"] = np.ones((2, 2), np.float32)
    extra.mkdir()
    write_all(extra, tensors)
    (extra / "config.json").write_text((source / "config.json").read_text())
    with pytest.raises(CheckpointError, match=r"unknown.weight"):
        stream_to_export(extra, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob("*.partial"))


# The peak resident memory of this process image (VmHWM; getrusage's ru_maxrss would carry the
# forking test process's own peak across exec).
_MEASURE = """
import runpy, sys
sys.argv = ["to_orbax", *sys.argv[1:]]
try:
    runpy.run_module("mimo_jax.convert.to_orbax", run_name="__main__")
except SystemExit as end:
    assert not end.code, end.code
status = open("/proc/self/status").read().split("VmHWM:")[1]
print("peak_kib", status.split()[0])
"""


def _peak_mib(source: pathlib.Path, out: pathlib.Path) -> float:
    done = subprocess.run([sys.executable, "-c", _MEASURE, "--hf", str(source), "--out",
                           str(out)], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"to {out}" in done.stdout
    return int(done.stdout.split("peak_kib")[-1]) / 1024


def test_command_streams_with_memory_bounded_by_a_tensor(tiny_config, random_params, tmp_path):
    """The command's peak resident memory grows by less than 3 tensors' worth when the model
    grows by ~145 MB of parameters: it never holds the model."""
    small = replace_model(tiny_config, num_mtp_heads=0)
    big = replace_model(small, num_experts=64, num_experts_per_token=2, hidden_size=256,
                        moe_intermediate_size=256, num_layers=4,
                        sliding=dataclasses.replace(small.sliding, num_heads=4),
                        full=dataclasses.replace(small.full, num_heads=4))
    peaks = {}
    for name, config in (("small", small), ("big", big)):
        source = tmp_path / name
        hf.save(config, random_params(config), str(source))
        peaks[name] = _peak_mib(source, tmp_path / f"{name}_export")
        sizes = [np.prod(s.shape) * np.dtype(s.dtype).itemsize
                 for s in jax.tree.leaves(hf.abstract_params(config))]
        if name == "big":
            total_mib = sum(sizes) / 2**20
            largest_mib = 256 * 256 * 4 / 2**20  # one expert's weight; embedding is smaller
    assert total_mib > 140, total_mib
    assert peaks["big"] - peaks["small"] < 3 * largest_mib + 30, (peaks, total_mib)
    config = json.loads((tmp_path / "big_export" / "model_config.json").read_text())
    assert config["num_experts"] == 64
