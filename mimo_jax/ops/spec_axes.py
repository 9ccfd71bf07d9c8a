"""Reading mesh-axis names out of PartitionSpecs, for the collectives inside shard_map."""

from __future__ import annotations

from jax.sharding import PartitionSpec


def spec_axes(entry) -> tuple[str, ...]:
    """A PartitionSpec entry (None, UNCONSTRAINED, one axis name, or a tuple of them) as a tuple
    of names."""
    if entry is None or entry is PartitionSpec.UNCONSTRAINED:
        return ()
    return (entry,) if isinstance(entry, str) else tuple(entry)


def collective_axis(axes: tuple[str, ...]):
    """The `axis_name` a collective takes for these axes: the name itself when there is one."""
    return axes[0] if len(axes) == 1 else axes


def pad_spec(spec: PartitionSpec, rank: int) -> PartitionSpec:
    """`spec` with trailing None entries up to `rank` (unsharded trailing dimensions)."""
    return PartitionSpec(*(tuple(spec) + (None,) * (rank - len(spec))))
