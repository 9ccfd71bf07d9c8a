"""Frozen, validated device-mesh configuration (the `mesh` section of a run config).

    config.mesh.rules = "fsdp_ep"           # a preset of `mimo_jax.parallel.rules`
    config.mesh.ici = "fsdp=-1,expert=8"    # axis sizes within a slice; -1 fills the rest
    config.mesh.dcn = "data=2"              # axis sizes across slices (multi-slice / multi-host)
    config.mesh.expert_capacity_factor = 0  # 0: dropless expert receive buffer

Axis sizes are written as "axis=size,..." strings (or dicts) so they can be set from the command
line; unnamed axes have size 1. At most one `-1` per network level fills the devices left over.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from mimo_jax.config import ConfigError
from mimo_jax.ops.moe.expert_parallel import TRANSPORTS as EXPERT_TRANSPORTS
from mimo_jax.parallel.rules import PRESETS

# Mesh axes in order from the least to the most communication-hungry: the device-mesh builder puts
# later axes on the closest devices (the tensor axis's per-layer all-reduces on neighbours).
MESH_AXES = ("data", "fsdp", "expert", "context", "tensor")


def _fail(key: str, value: Any, why: str) -> None:
    raise ConfigError(f"config key {key!r} = {value!r}: {why}")


def parse_axis_sizes(value: Any, key: str) -> dict[str, int]:
    """"fsdp=-1,expert=8" (or a mapping) -> {"fsdp": -1, "expert": 8}; unknown axes fail."""
    if value is None or value == "":
        return {}
    if isinstance(value, str):
        items = []
        for entry in (e.strip() for e in value.split(",")):
            if not entry:
                continue
            name, sep, size = entry.partition("=")
            if not sep:
                _fail(key, value, f"entry {entry!r} is not 'axis=size'")
            items.append((name.strip(), size.strip()))
    elif isinstance(value, Mapping):
        items = list(value.items())
    else:
        _fail(key, value, "must be an 'axis=size,...' string or a mapping")
    sizes: dict[str, int] = {}
    for name, size in items:
        if name not in MESH_AXES:
            _fail(key, value, f"axis {name!r} is not one of {MESH_AXES}")
        if name in sizes:
            _fail(key, value, f"axis {name!r} is given twice")
        try:
            size = int(size)
        except (TypeError, ValueError):
            _fail(key, value, f"size {size!r} of axis {name!r} is not an integer")
        if size == 0 or size < -1:
            _fail(key, value, f"size {size} of axis {name!r} must be >= 1 or -1 (fill)")
        sizes[name] = size
    if sum(1 for s in sizes.values() if s == -1) > 1:
        _fail(key, value, "at most one axis may be -1")
    return sizes


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """How devices form a mesh and how the model's logical axes map onto it.

    ici: axis sizes within a slice (fast interconnect), one per `MESH_AXES` entry.
    dcn: axis sizes across slices (data-centre network); the product is the number of slices.
    rules: name of a logical-axis rule preset (`mimo_jax.parallel.rules.PRESETS`).
    expert_capacity_factor: the expert-parallel receive buffer holds
      ceil(factor * expected token copies per shard) rows; copies past it are dropped. 0 means
      dropless: the buffer holds the worst case (every copy landing on one shard).
    expert_transport: how token copies move between expert shards: "ragged_all_to_all" (TPU,
      GPU), "all_to_all" (a padded dense exchange that every backend runs, CPU included) or
      "auto" (the first where the backend has it, else the second).
    """

    ici: tuple[tuple[str, int], ...]
    dcn: tuple[tuple[str, int], ...]
    rules: str
    expert_capacity_factor: float
    expert_transport: str

    def ici_sizes(self) -> dict[str, int]:
        return dict(self.ici)

    def dcn_sizes(self) -> dict[str, int]:
        return dict(self.dcn)

    def validate(self) -> "MeshConfig":
        if self.rules not in PRESETS:
            _fail("mesh.rules", self.rules, f"must be one of {sorted(PRESETS)}")
        if self.expert_capacity_factor < 0:
            _fail("mesh.expert_capacity_factor", self.expert_capacity_factor,
                  "must be >= 0 (0 = dropless)")
        if self.expert_transport not in EXPERT_TRANSPORTS:
            _fail("mesh.expert_transport", self.expert_transport,
                  f"must be one of {EXPERT_TRANSPORTS}")
        return self


_DEFAULTS: dict[str, Any] = dict(ici="fsdp=-1", dcn="", rules="fsdp",
                                 expert_capacity_factor=0.0, expert_transport="auto")


def _as_tuple(sizes: dict[str, int]) -> tuple[tuple[str, int], ...]:
    return tuple((axis, sizes.get(axis, 1)) for axis in MESH_AXES)


def mesh_config_from_dict(cfg: Mapping[str, Any] | None) -> MeshConfig:
    """Builds and validates a `MeshConfig` from the `mesh` section of a run config (None: defaults,
    pure FSDP over all devices)."""
    cfg = {} if cfg is None else dict(cfg)
    known = set(_DEFAULTS)
    for key in cfg:
        if key not in known:
            raise ConfigError(f"config key 'mesh.{key}' is unknown; known keys: {sorted(known)}")
    values = dict(_DEFAULTS)
    values.update(cfg)
    return MeshConfig(
        ici=_as_tuple(parse_axis_sizes(values["ici"], "mesh.ici")),
        dcn=_as_tuple(parse_axis_sizes(values["dcn"], "mesh.dcn")),
        rules=str(values["rules"]),
        expert_capacity_factor=float(values["expert_capacity_factor"]),
        expert_transport=str(values["expert_transport"]),
    ).validate()
