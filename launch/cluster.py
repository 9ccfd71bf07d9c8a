"""Where a job runs: a TPU slice or GPU hosts on GKE, described as Kubernetes needs them.

A multi-host TPU slice is one pod per TPU VM host: v4 and v5p hosts hold 4 chips (a slice
name counts TensorCores, 2 per chip: v5p-512 = 256 chips = 64 hosts); v5e and v6e slices of more
than 8 chips are 4-chip hosts too, smaller ones a single host. Each pod asks for its host's chips
(`google.com/tpu`) and lands on the slice's node pool through GKE's TPU node selectors
(accelerator and physical topology). GPU hosts hold 8 GPUs (`nvidia.com/gpu`), selected by
GKE's accelerator label.
"""

from __future__ import annotations

import dataclasses
import math

from mimo_jax.parallel.memory import GPUS_PER_HOST, parse_slice

# GKE's `cloud.google.com/gke-tpu-accelerator` value per TPU generation.
TPU_ACCELERATORS = {"v4": "tpu-v4-podslice", "v5p": "tpu-v5p-slice",
                    "v5e": "tpu-v5-lite-podslice", "v6e": "tpu-v6e-slice"}
# GKE's `cloud.google.com/gke-accelerator` value per GPU type.
GPU_ACCELERATORS = {"A100": "nvidia-a100-80gb", "H100": "nvidia-h100-80gb",
                    "H200": "nvidia-h200-141gb", "B200": "nvidia-b200"}
TPU_CHIPS_PER_HOST = 4
SINGLE_HOST_MAX_CHIPS = 8  # v5e / v6e slices up to 8 chips are one host
TPU_RESOURCE, GPU_RESOURCE = "google.com/tpu", "nvidia.com/gpu"


@dataclasses.dataclass(frozen=True)
class Accelerator:
    """The hosts of one job: how many, what each pod requests, where it is scheduled."""

    slice_name: str
    hosts: int
    devices_per_host: int
    resource: str  # the Kubernetes resource name of one device
    node_selector: dict[str, str]

    @property
    def devices(self) -> int:
        return self.hosts * self.devices_per_host


def tpu_slice(slice_name: str, topology: str) -> Accelerator:
    """A TPU slice and its physical topology ("8x8x4"), which must hold the slice's chips."""
    kind = slice_name.split("-")[0]
    if kind not in TPU_ACCELERATORS:
        raise ValueError(f"slice {slice_name!r} is not a TPU slice ({sorted(TPU_ACCELERATORS)})")
    chips = parse_slice(slice_name).num_devices
    try:
        dims = [int(d) for d in topology.lower().split("x")]
    except ValueError as err:
        raise ValueError(f"topology {topology!r} is not like '8x8x4'") from err
    if math.prod(dims) != chips:
        raise ValueError(f"topology {topology!r} has {math.prod(dims)} chips but {slice_name} "
                         f"has {chips}")
    per_host = chips if (kind in ("v5e", "v6e") and chips <= SINGLE_HOST_MAX_CHIPS) \
        else min(chips, TPU_CHIPS_PER_HOST)
    return Accelerator(slice_name, chips // per_host, per_host, TPU_RESOURCE, {
        "cloud.google.com/gke-tpu-accelerator": TPU_ACCELERATORS[kind],
        "cloud.google.com/gke-tpu-topology": topology.lower()})


def gpu_hosts(slice_name: str) -> Accelerator:
    """GPU hosts named like the memory plan's slices: "8xH100" (one host), "64xH200" (eight)."""
    spec = parse_slice(slice_name)
    kind = slice_name.split("x", 1)[-1]
    if kind not in GPU_ACCELERATORS:
        raise ValueError(f"slice {slice_name!r} is not a GPU slice like 8xH100 "
                         f"({sorted(GPU_ACCELERATORS)})")
    per_host = min(spec.num_devices, GPUS_PER_HOST)
    return Accelerator(slice_name, spec.num_devices // per_host, per_host, GPU_RESOURCE,
                       {"cloud.google.com/gke-accelerator": GPU_ACCELERATORS[kind]})
