"""Reading mesh-axis names out of a PartitionSpec entry, for the collectives inside shard_map."""

from __future__ import annotations


def spec_axes(entry) -> tuple[str, ...]:
    """A PartitionSpec entry (None, one axis name, or a tuple of them) as a tuple of names."""
    if entry is None:
        return ()
    return (entry,) if isinstance(entry, str) else tuple(entry)


def collective_axis(axes: tuple[str, ...]):
    """The `axis_name` a collective takes for these axes: the name itself when there is one."""
    return axes[0] if len(axes) == 1 else axes
