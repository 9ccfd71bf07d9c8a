"""Where the trainer's arrays live: the device mesh and sharding rules of `config.mesh`.

`mimo_jax.parallel` builds the mesh (ICI/DCN axis sizes, one process or many) over the first
`train.num_devices` devices and resolves the rule preset: parameters and optimizer state are split
as the rules say (pure FSDP by default), batches along the batch (and, with context parallelism,
the sequence) axes. The train and eval steps are jitted by `Parallelism`, which traces them under
the mesh and the logical rules, so the model's sharding constraints, expert-parallel dispatch and
context-parallel attention take effect.
"""

from __future__ import annotations

import jax
from jax.sharding import NamedSharding, PartitionSpec as P

from mimo_jax.config import ConfigError
from mimo_jax.parallel import Parallelism, rules as rules_lib
from mimo_jax.parallel.config import MeshConfig
from mimo_jax.parallel.sharding import batch_spec


def make_parallelism(mesh_config: MeshConfig, num_devices: int = 0) -> Parallelism:
    """The mesh over the first `num_devices` devices (0 = all of them) and the rules."""
    devices = jax.devices()
    if num_devices > len(devices):
        raise ConfigError(f"config key 'train.num_devices' = {num_devices}: only "
                          f"{len(devices)} devices are available")
    return Parallelism.from_config(mesh_config, devices[:num_devices] if num_devices else devices)


def check_batch(batch_size: int, seq_len: int, grad_accum_steps: int,
                parallelism: Parallelism) -> None:
    """Each micro-batch must split evenly over the batch axes, each row over the length axes."""
    if batch_size % grad_accum_steps:
        raise ConfigError(f"config key 'data.batch_size' = {batch_size}: must be divisible by "
                          f"train.grad_accum_steps={grad_accum_steps}")
    spec = batch_spec(2, parallelism.rules)
    rows = rules_lib.shard_count(P(spec[0]), parallelism.mesh)
    if (batch_size // grad_accum_steps) % rows:
        raise ConfigError(f"config key 'data.batch_size' = {batch_size}: each of the "
                          f"{grad_accum_steps} micro-batches must split over the {rows} "
                          f"batch shards of the mesh (mesh axes {rules_lib.spec_axes(spec[0])})")
    pieces = rules_lib.shard_count(P(spec[1]), parallelism.mesh)
    if seq_len % pieces:
        raise ConfigError(f"config key 'data.seq_len' = {seq_len}: must split over the {pieces} "
                          f"context shards of the mesh")


def batch_sharding(parallelism: Parallelism) -> NamedSharding:
    """[B, T] arrays: rows over the batch axes, the sequence over the context axes."""
    return parallelism.sharding(batch_spec(2, parallelism.rules))
