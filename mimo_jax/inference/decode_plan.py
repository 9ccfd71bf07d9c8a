"""Bytes per device of serving a model on a named slice: the weights as the rule preset splits
them, and the KV cache of a batch at given context lengths, rows split over the batch axes (as
`inference.on_mesh` decodes). Shapes come from `jax.eval_shape`; nothing is allocated.

Legend: B batch rows, S cache slots (the context length for global layers, the window for
sliding ones).
"""

from __future__ import annotations

import dataclasses
import math

import flax.linen as nn

from mimo_jax.config import ModelConfig, replace_model
from mimo_jax.inference.cache import cache_bytes, cache_shapes
from mimo_jax.model.transformer import MiMoV2Flash
from mimo_jax.parallel import rules as rules_lib
from mimo_jax.parallel.config import MESH_AXES, MeshConfig
from mimo_jax.parallel.memory import (GIB, USABLE_FRACTION, SliceSpec, describe_slice,
                                      tree_bytes)
from mimo_jax.parallel.mesh import mesh_shape
from mimo_jax.parallel.sharding import logical_param_specs

LENGTHS = (32_768, 262_144)  # the report's two training contexts


@dataclasses.dataclass(frozen=True)
class DecodePlan:
    """weight_bytes and, per context length, cache_bytes: on the fullest device."""

    slice: SliceSpec
    axis_sizes: dict[str, int]
    rules: str
    param_dtype: str
    batch: int
    rows_per_device: int
    weight_bytes: int
    cache_bytes: dict[int, int]

    @property
    def usable(self) -> int:
        return int(self.slice.hbm_bytes * USABLE_FRACTION)

    def fits(self, length: int) -> bool:
        return self.weight_bytes + self.cache_bytes[length] <= self.usable


def plan_decode(model_config: ModelConfig, mesh_config: MeshConfig, slice_spec: SliceSpec, *,
                batch: int = 0, lengths: tuple[int, ...] = LENGTHS,
                param_dtype: str = "bfloat16") -> DecodePlan:
    """The per-device memory of decoding `batch` rows (0: one row per batch shard) at each of
    `lengths` tokens, weights in `param_dtype`, KV cache in the model's compute dtype."""
    model_config = replace_model(model_config, param_dtype=param_dtype)
    ici, dcn = mesh_shape(mesh_config, slice_spec.num_devices, slice_spec.num_slices)
    sizes = {a: i * d for a, i, d in zip(MESH_AXES, ici, dcn)}
    rules = rules_lib.get_rules(mesh_config.rules)
    params, logical = logical_param_specs(MiMoV2Flash(model_config))
    weight_bytes = tree_bytes(params, nn.logical_to_mesh(logical, rules), sizes)
    batch_axes = rules_lib.spec_axes(rules_lib.mesh_axes(("batch",), rules)[0])
    shards = math.prod(sizes[a] for a in batch_axes)
    batch = batch or shards
    rows = -(-batch // shards)
    # Each device holds its rows' whole cache: the KV heads are not split (the presets keep the
    # 4 global KV heads whole), so the cache of `rows` rows is the per-device figure.
    caches = {n: cache_bytes(cache_shapes(model_config, rows, n)) for n in lengths}
    return DecodePlan(slice_spec, sizes, mesh_config.rules, param_dtype, batch, rows,
                      weight_bytes, caches)


def format_decode_plan(plan: DecodePlan, header: str) -> str:
    """The table `python -m mimo_jax.plan --mode decode` prints."""
    lines = [header,
             f"{describe_slice(plan.slice, plan.axis_sizes, plan.rules)}; batch {plan.batch} "
             f"rows, {plan.rows_per_device} per device",
             f"{'weights':26s}{plan.weight_bytes / GIB:9.2f} GiB   {plan.param_dtype}"]
    for length, nbytes in plan.cache_bytes.items():
        total = plan.weight_bytes + nbytes
        verdict = "fits" if plan.fits(length) else "does NOT fit"
        lines.append(f"{f'KV cache at {length:,}':26s}{nbytes / GIB:9.2f} GiB   total "
                     f"{total / GIB:.2f} GiB: {verdict} ({total / plan.slice.hbm_bytes:.0%} of "
                     f"HBM, limit {USABLE_FRACTION:.0%})")
    return "\n".join(lines)
