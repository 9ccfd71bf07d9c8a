"""Frozen, validated device-mesh configuration (the `mesh` section of a run config).

    config.mesh.rules = "fsdp_ep"           # a preset of `mimo_jax.parallel.rules`
    config.mesh.ici = "fsdp=-1,expert=8"    # axis sizes within a slice; -1 fills the rest
    config.mesh.dcn = "data=2"              # axis sizes across slices (multi-slice / multi-host)

Axis sizes are written as "axis=size,..." strings (or dicts) so they can be set from the command
line; unnamed axes have size 1. At most one `-1` per network level fills the devices left over.
The expert-parallel options (capacity factor, transport) are runtime choices of the model:
`config.model.runtime` (`mimo_jax.config.RuntimeConfig`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from mimo_jax.config_reader import Section, fail, option, read_section
from mimo_jax.parallel.rules import PRESETS

# Mesh axes in order from the least to the most communication-hungry: the device-mesh builder puts
# later axes on the closest devices (the tensor axis's per-layer all-reduces on neighbours).
MESH_AXES = ("data", "fsdp", "expert", "context", "tensor")


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
                fail(key, value, f"entry {entry!r} is not 'axis=size'")
            items.append((name.strip(), size.strip()))
    elif isinstance(value, Mapping):
        items = list(value.items())
    else:
        fail(key, value, "must be an 'axis=size,...' string or a mapping")
    sizes: dict[str, int] = {}
    for name, size in items:
        if name not in MESH_AXES:
            fail(key, value, f"axis {name!r} is not one of {MESH_AXES}")
        if name in sizes:
            fail(key, value, f"axis {name!r} is given twice")
        try:
            size = int(size)
        except (TypeError, ValueError):
            fail(key, value, f"size {size!r} of axis {name!r} is not an integer")
        if size == 0 or size < -1:
            fail(key, value, f"size {size} of axis {name!r} must be >= 1 or -1 (fill)")
        sizes[name] = size
    if sum(1 for s in sizes.values() if s == -1) > 1:
        fail(key, value, "at most one axis may be -1")
    return sizes


def _as_tuple(sizes: dict[str, int]) -> tuple[tuple[str, int], ...]:
    return tuple((axis, sizes.get(axis, 1)) for axis in MESH_AXES)


def _axis_sizes(value: Any, key: str) -> tuple[tuple[str, int], ...]:
    return _as_tuple(parse_axis_sizes(value, key))


def format_axis_sizes(sizes: tuple[tuple[str, int], ...]) -> str:
    """The inverse of `parse_axis_sizes` for a field: "fsdp=-1,expert=8" (size-1 axes left out)."""
    return ",".join(f"{axis}={size}" for axis, size in sizes if size != 1)


def _rule_preset(name: str) -> str | None:
    return None if name in PRESETS else f"must be one of {sorted(PRESETS)}"


@dataclasses.dataclass(frozen=True, kw_only=True)
class MeshConfig(Section):
    """How devices form a mesh and how the model's logical axes map onto it.

    ici: axis sizes within a slice (fast interconnect), one per `MESH_AXES` entry.
    dcn: axis sizes across slices (data-centre network); the product is the number of slices.
    rules: name of a logical-axis rule preset (`mimo_jax.parallel.rules.PRESETS`).
    """

    SECTION = "mesh"
    MOVED = {"expert_capacity_factor": "model.runtime.expert_capacity_factor",
             "expert_transport": "model.runtime.expert_transport"}

    ici: tuple[tuple[str, int], ...] = option(_as_tuple({"fsdp": -1}), parse=_axis_sizes,
                                              dump=format_axis_sizes)
    dcn: tuple[tuple[str, int], ...] = option(_as_tuple({}), parse=_axis_sizes,
                                              dump=format_axis_sizes)
    rules: str = option("fsdp", check=_rule_preset)

    def ici_sizes(self) -> dict[str, int]:
        return dict(self.ici)

    def dcn_sizes(self) -> dict[str, int]:
        return dict(self.dcn)


def mesh_config_from_dict(cfg: Mapping[str, Any] | None) -> MeshConfig:
    """Builds and validates a `MeshConfig` from the `mesh` section of a run config (None: defaults,
    pure FSDP over all devices)."""
    return read_section(MeshConfig, cfg)
