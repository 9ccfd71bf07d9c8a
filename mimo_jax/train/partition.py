"""Where the trainer's arrays live: a one-axis data-parallel mesh over the devices.

Parameters and optimizer state are replicated, batches are split along the batch axis. The
model's own logical-axis annotations are inactive here (no rules are installed), so the same
program runs on one CPU or a slice of accelerators.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from mimo_jax.config import ConfigError

DATA_AXIS = "data"


def make_mesh(num_devices: int = 0) -> Mesh:
    """A ("data",) mesh over the first `num_devices` devices (0 = all of them)."""
    devices = jax.devices()
    if num_devices > len(devices):
        raise ConfigError(f"config key 'train.num_devices' = {num_devices}: only "
                          f"{len(devices)} devices are available")
    chosen = devices[:num_devices] if num_devices else devices
    return Mesh(np.asarray(chosen), (DATA_AXIS,), axis_types=(jax.sharding.AxisType.Auto,))


def check_batch(batch_size: int, grad_accum_steps: int, mesh: Mesh) -> None:
    """The global batch must split evenly into micro-batches and over the data axis."""
    devices = mesh.shape[DATA_AXIS]
    if batch_size % grad_accum_steps:
        raise ConfigError(f"config key 'data.batch_size' = {batch_size}: must be divisible by "
                          f"train.grad_accum_steps={grad_accum_steps}")
    if batch_size % devices:
        raise ConfigError(f"config key 'data.batch_size' = {batch_size}: must be divisible by "
                          f"the {devices} data-parallel devices (set train.num_devices)")


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """[B, T] arrays split along B."""
    return NamedSharding(mesh, P(DATA_AXIS))


def state_shardings(abstract_state: Any, mesh: Mesh) -> Any:
    """Every leaf of the train state replicated."""
    return jax.tree.map(lambda _: replicated(mesh), abstract_state)


def global_batch(local_batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Per-process numpy rows -> one global jax.Array per key, split along the batch axis."""
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local_batch.items()}
