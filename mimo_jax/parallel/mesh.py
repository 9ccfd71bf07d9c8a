"""Builds the device mesh from a `MeshConfig`, for one process or many.

A mesh has the five axes of `MESH_AXES` (size 1 where unused). Each axis size is the product of
its within-slice (ICI) size and its across-slice (DCN) size. With more than one slice (TPU
multi-slice, or several GPU/CPU hosts where each process is a slice) the device array is built by
`mesh_utils.create_hybrid_device_mesh`, so that DCN-split axes only cross slice borders; otherwise
by `mesh_utils.create_device_mesh`, which follows the TPU torus.

Multi-host: call `jax.distributed.initialize(...)` first (see `initialize_distributed`); then
`jax.devices()` lists every process's devices and the same mesh is built in each process.
"""

from __future__ import annotations

import math
import os
from typing import Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils

from mimo_jax.config import ConfigError
from mimo_jax.parallel.config import MESH_AXES, MeshConfig


def _fill(sizes: dict[str, int], total: int, key: str) -> tuple[int, ...]:
    """Resolves one `-1` so that the sizes multiply to `total`. Returns sizes in MESH_AXES order."""
    known = math.prod(s for s in sizes.values() if s != -1)
    if -1 in sizes.values():
        if total % known:
            raise ConfigError(f"config key {key!r} = {sizes}: the fixed sizes multiply to {known}, "
                              f"which does not divide {total}")
        sizes = {a: (total // known if s == -1 else s) for a, s in sizes.items()}
    shape = tuple(sizes.get(axis, 1) for axis in MESH_AXES)
    if math.prod(shape) != total:
        raise ConfigError(f"config key {key!r} = {sizes}: the sizes multiply to "
                          f"{math.prod(shape)}, but there are {total} to fill")
    return shape


def _granules(devices: Sequence[jax.Device]) -> tuple[str, int]:
    """What counts as a slice among `devices` and how many there are: TPU slices
    ('slice_index'; one slice however many hosts it spans), else processes ('process_index':
    a GPU or CPU host running one process)."""
    if devices[0].platform == "tpu" and hasattr(devices[0], "slice_index"):
        return "slice_index", len({d.slice_index for d in devices})
    return "process_index", len({d.process_index for d in devices})


def mesh_shape(config: MeshConfig, num_devices: int,
               num_slices: int = 1) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(ICI shape, DCN shape) in MESH_AXES order, with `-1` entries filled.

    num_devices counts all devices; num_slices the slices (or processes) they form.
    """
    if num_devices % num_slices:
        raise ConfigError(f"{num_devices} devices do not split evenly into {num_slices} slices")
    dcn = _fill(config.dcn_sizes(), num_slices, "mesh.dcn")
    ici = _fill(config.ici_sizes(), num_devices // math.prod(dcn), "mesh.ici")
    return ici, dcn


def make_mesh(config: MeshConfig, devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
    """The device mesh for `config` over `devices` (default: all devices of all processes).

    Every axis has AxisType.Auto: the compiler propagates shardings between the explicit ones
    that `mimo_jax.parallel.sharding` puts on parameters, batches and activations.
    """
    devices = list(jax.devices() if devices is None else devices)
    granule_attr, num_granules = _granules(devices)
    dcn_sizes = config.dcn_sizes()
    if granule_attr == "process_index" and math.prod(dcn_sizes.values()) == 1:
        # Processes on GPU/CPU count as slices only when the config splits an axis across them.
        num_granules = 1
    ici, dcn = mesh_shape(config, len(devices), num_granules)
    if math.prod(dcn) > 1:
        device_array = mesh_utils.create_hybrid_device_mesh(
            ici, dcn, devices, process_is_granule=granule_attr == "process_index",
            allow_split_physical_axes=True)
    else:
        device_array = mesh_utils.create_device_mesh(ici, devices, allow_split_physical_axes=True)
    shape = tuple(i * d for i, d in zip(ici, dcn))
    device_array = np.asarray(device_array).reshape(shape)
    return jax.sharding.Mesh(device_array, MESH_AXES,
                             axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))


def initialize_distributed(coordinator_address: str | None = None,
                           num_processes: int | None = None, process_id: int | None = None,
                           *, auto_detect: bool = False, **kwargs) -> bool:
    """Joins a multi-process run before any other JAX call. Returns whether it did.

    Pass the coordinator ("host:port"), the process count and this process's id explicitly
    (e.g. several processes on one machine), or `auto_detect=True`: then the environment's
    JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID (what `launch/` sets in its
    Kubernetes jobs) fill what is not given, and JAX finds the rest itself on Cloud TPU pods
    and SLURM/Kubernetes GPU clusters. With none of these, or with one process, it does nothing.
    """
    if auto_detect:
        env = os.environ
        coordinator_address = coordinator_address or env.get("JAX_COORDINATOR_ADDRESS")
        if num_processes is None and env.get("JAX_NUM_PROCESSES"):
            num_processes = int(env["JAX_NUM_PROCESSES"])
        if process_id is None and env.get("JAX_PROCESS_ID"):
            process_id = int(env["JAX_PROCESS_ID"])
    if num_processes == 1:
        return False
    explicit = (coordinator_address, num_processes, process_id) != (None, None, None)
    if not explicit and not auto_detect:
        return False
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id, **kwargs)
    return True
