"""A tiny MiMo-V2-Flash config with MTP heads, random parameters, and checkpoint-editing helpers."""

import dataclasses

import jax
import numpy as np
import pytest

from configs import tiny
from mimo_jax.config import model_config_from_dict, replace_model, with_runtime
from mimo_jax.convert.safetensors_io import CheckpointReader, PendingTensor, write_checkpoint
from mimo_jax.convert import hf


@pytest.fixture(scope="session")
def tiny_config():
    """4 layers (GA dense, SWA MoE x2, GA MoE), 4 experts top-2, 2 MTP heads, transformers-shaped."""
    config = model_config_from_dict(tiny.get_config().model)
    return with_runtime(replace_model(
        config, vocab_size=256, hidden_size=64, num_layers=4,
        layer_types=("global", "sliding", "sliding", "global"),
        mlp_types=("dense", "moe", "moe", "moe"), dense_intermediate_size=96,
        moe_intermediate_size=16, num_experts=4, num_experts_per_token=2, num_mtp_heads=2,
        sliding=dataclasses.replace(config.sliding, sliding_window=5)),
        attention_impl="reference", moe_impl="dense")


def _random_params(config, seed=0):
    """Random parameters in numpy (no init compile): weights N(0, 0.1), norm scales near 1."""
    rng = np.random.default_rng(seed)

    def draw(path, spec):
        mean = 1.0 if jax.tree_util.keystr(path).endswith("['scale']") else 0.0
        return (mean + rng.normal(0.0, 0.1, spec.shape)).astype(spec.dtype)
    return jax.tree_util.tree_map_with_path(draw, hf.abstract_params(config))


@pytest.fixture(scope="session")
def random_params():
    """random_params(config, seed=0) -> a random parameter tree for `config`."""
    return _random_params


@pytest.fixture(scope="session")
def tiny_params(tiny_config):
    return _random_params(tiny_config)


def _read_all(directory):
    reader = CheckpointReader(directory)
    return {name: np.array(reader.get(name)) for name in reader.names()}


def _write_all(directory, tensors, max_shard_bytes=5 * 2**30):
    write_checkpoint(directory, [PendingTensor(n, tuple(v.shape), v.dtype, lambda v=v: v)
                                 for n, v in tensors.items()], max_shard_bytes)


@pytest.fixture
def read_all():
    """read_all(directory) -> {name: numpy array} of every tensor in a checkpoint."""
    return _read_all


@pytest.fixture
def write_all():
    """write_all(directory, {name: array}, max_shard_bytes=...) writes them as safetensors."""
    return _write_all
