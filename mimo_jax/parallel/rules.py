"""Logical-axis rule presets: which mesh axes each logical axis name is split over.

The model names the axes of every weight and activation (`embed`, `heads`, `kv_heads`,
`head_dim`, `mlp`, `experts`, `vocab`, `norm`, `layers`; activations also `batch`, `length`).
A preset is an ordered tuple of `(logical name, mesh axes)` pairs. Flax resolves an array's names
in rule order: a rule applies when its logical name is one of the array's axes, that axis is still
unassigned and none of the rule's mesh axes is taken yet, so a later rule for the same name is a
fallback. Names without a rule stay unsplit.

Weights and activations share the names `embed`, `heads`, `mlp` and `vocab`; the `batch` rule comes
first so that an activation [batch, length, embed] puts `fsdp` on the batch and leaves its model
dim whole, while a weight [embed, mlp] (no batch axis) puts `fsdp` on `embed`.
"""

from __future__ import annotations

import flax.linen as nn
import jax
from jax.sharding import PartitionSpec

from mimo_jax.ops.spec_axes import spec_axes

Rules = tuple[tuple[str, str | tuple[str, ...] | None], ...]

# Every preset splits the batch over all the axes that do not split the sequence or the heads.
_BATCH = (("batch", ("data", "fsdp", "expert")),)
_FSDP = (("embed", "fsdp"),)
# With expert parallelism the non-expert weights are also split over the expert axis (as extra
# FSDP); expert weights take `expert` for their expert dim first, so their `embed` falls back to
# `fsdp` alone.
_EXPERT = (("experts", "expert"), ("embed", ("fsdp", "expert")), ("embed", "fsdp"))
# With context parallelism the weights are also split over the context axis (extra FSDP), so
# that every device holds 1/devices of them.
_FSDP_CP = (("embed", ("fsdp", "context")), ("embed", "fsdp"))
_EXPERT_CP = (("experts", "expert"), ("embed", ("fsdp", "context", "expert")),
              ("embed", ("fsdp", "context")), ("embed", "fsdp"))
_TENSOR = (("heads", "tensor"), ("mlp", "tensor"), ("vocab", "tensor"))
_CONTEXT = (("length", "context"),)

PRESETS: dict[str, Rules] = {
    # ZeRO-3: every weight split over fsdp on its model dim, batch over data x fsdp x expert.
    "fsdp": _BATCH + _FSDP,
    # + Megatron tensor parallelism: query heads, FFN/expert hidden dim and vocab over tensor
    # (KV heads stay whole: 4 GA KV heads do not split 8 ways).
    "fsdp_tp": _BATCH + _TENSOR + _FSDP,
    # + expert parallelism: experts over the expert axis, tokens moved by all-to-all.
    "fsdp_ep": _BATCH + _EXPERT,
    # + context parallelism: the sequence over the context axis.
    "fsdp_cp": _BATCH + _CONTEXT + _FSDP_CP,
    "fsdp_ep_cp": _BATCH + _CONTEXT + _EXPERT_CP,
    "fsdp_tp_ep": _BATCH + _TENSOR + _EXPERT,
    "fsdp_tp_ep_cp": _BATCH + _CONTEXT + _TENSOR + _EXPERT_CP,
}


def get_rules(name: str) -> Rules:
    """The preset called `name`; an unknown name raises a ValueError listing the presets."""
    if name not in PRESETS:
        raise ValueError(f"logical axis rule preset {name!r} is not one of {sorted(PRESETS)}")
    return PRESETS[name]


def mesh_axes(logical: tuple[str | None, ...], rules: Rules) -> PartitionSpec:
    """Logical axis names of one array -> its mesh PartitionSpec under `rules`."""
    return nn.logical_to_mesh_axes(logical, rules)


def shard_count(spec: PartitionSpec, mesh: jax.sharding.Mesh | jax.sharding.AbstractMesh) -> int:
    """How many pieces an array with this PartitionSpec is cut into on `mesh`."""
    sizes = dict(mesh.shape)
    count = 1
    for entry in spec:
        for axis in spec_axes(entry):
            count *= sizes[axis]
    return count
