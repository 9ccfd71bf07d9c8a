"""What a launched pretraining job runs, independent of XManager (so it is testable anywhere).

A job is `python -m mimo_jax.train.pretrain --config=... --workdir=... [--distributed]` plus
config overrides; on an accelerator slice the slice name and the physical topology must agree,
and the run's per-device memory (`mimo_jax.parallel.memory`) must fit before anything is queued.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from mimo_jax.parallel.memory import TPU_TYPES, parse_slice
from mimo_jax.run_config import load_config
from mimo_jax.train.memory_plan import plan_for_config

ENTRYPOINT = "mimo_jax.train.pretrain"
# XManager resource names of the TPU generations in `mimo_jax.parallel.memory.TPU_TYPES`.
TPU_RESOURCES = {"v4": "tpu_v4", "v5p": "tpu_v5p", "v5e": "tpu_v5e", "v6e": "tpu_v6e"}


def parse_overrides(items: list[str] | tuple[str, ...]) -> dict[str, str]:
    """["train.steps=10", "mesh.rules=fsdp_ep"] -> {"config.train.steps": "10", ...}."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"override {item!r} is not 'section.key=value'")
        if key.startswith("config."):
            key = key[len("config."):]
        if "." not in key:
            raise ValueError(f"override {item!r} names no section (e.g. 'train.steps=10')")
        out[f"config.{key}"] = value
    return out


@dataclasses.dataclass(frozen=True)
class TpuRequest:
    """A TPU slice: the XManager resource name and the topology string (e.g. "8x8x4")."""

    resource: str
    topology: str
    chips: int


def tpu_request(slice_name: str, topology: str) -> TpuRequest:
    """Checks that `topology` has as many chips as `slice_name` (e.g. v5p-512 = 256 chips)."""
    kind = slice_name.split("-")[0]
    if kind not in TPU_TYPES:
        raise ValueError(f"slice {slice_name!r} is not a TPU slice ({sorted(TPU_TYPES)})")
    chips = parse_slice(slice_name).num_devices
    try:
        dims = [int(d) for d in topology.lower().split("x")]
    except ValueError as err:
        raise ValueError(f"topology {topology!r} is not like '8x8x4'") from err
    if math.prod(dims) != chips:
        raise ValueError(f"topology {topology!r} has {math.prod(dims)} chips but {slice_name} "
                         f"has {chips}")
    return TpuRequest(TPU_RESOURCES[kind], topology.lower(), chips)


@dataclasses.dataclass(frozen=True)
class PretrainJob:
    """The command-line arguments of one pretraining job."""

    config: str
    workdir: str
    overrides: tuple[str, ...] = ()
    distributed: bool = False

    def args(self) -> dict[str, Any]:
        """Flag name -> value for `python -m mimo_jax.train.pretrain`."""
        args: dict[str, Any] = {"config": self.config, "workdir": self.workdir}
        if self.distributed:
            args["distributed"] = True
        args.update(parse_overrides(self.overrides))
        return args

    def command(self) -> list[str]:
        """The same as a command line (for logs and local dry runs)."""
        flags = []
        for key, value in self.args().items():
            flags.append(f"--{key}" if value is True else f"--{key}={value}")
        return ["python", "-m", ENTRYPOINT] + flags


def check_memory(config_path: str, overrides: tuple[str, ...], slice_name: str,
                 param_dtype: str | None = None) -> str:
    """The plan table for the job; raises ValueError if it does not fit the slice (or if the
    config or an override is bad: `ConfigError` is a ValueError)."""
    config = load_config(config_path, parse_overrides(overrides))
    result, table = plan_for_config(config, slice_name, param_dtype=param_dtype)
    if not result.fits:
        raise ValueError(f"the run does not fit {slice_name}:\n{table}")
    return table
