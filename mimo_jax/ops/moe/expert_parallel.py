"""Expert-parallel MoE dispatch: token copies travel to the shard that owns their expert and back.

Runs inside `jax.shard_map` over the whole mesh. Each shard holds E/P experts (P = size of the mesh
axes that split the experts) and its own tokens. Per shard:

  1. sort its T*k token copies by expert (padding tokens are not sent);
  2. exchange per-expert counts with `all_to_all`; each receiver lays out what it will get grouped
     by its local expert, then by source shard, so every local expert's rows are contiguous;
  3. send the copies with `ragged_all_to_all` (slice e of the sorted copies goes to shard
     e // (E/P), at the offset the receiver chose) into a receive buffer of R rows;
  4. run the local experts with grouped matmuls (`ragged_dot`) over the buffer;
  5. send the results back the same way (`ragged_all_to_all` with the offsets swapped), unsort,
     weight by the gates and sum the k copies of each token.

Capacity: with capacity factor c > 0, every source shard may send each expert at most
q = ceil(c * T * k / E) copies (c times its share under a balanced load), so a receive buffer of
R = (E/P) * P * q rows always suffices. When a source has more copies for an expert, it keeps
those with the largest gate weights (ties: the earlier copy) and drops the rest: their
contribution is zero. The rule never depends on an expert's or a shard's index. Capacity factor 0
means dropless: nothing is clipped and R = P * T * min(k, E/P), the most copies that can land on
one shard. `dispatch(..., with_drops=True)` also returns how many copies were dropped.

Transport: `ragged_all_to_all` on TPU and GPU. XLA:CPU has no ragged all-to-all, so "all_to_all"
runs the same exchange as a padded dense `all_to_all` plus a scatter, with the identical contract
(`ragged_all_to_all_dense`); "auto" picks per backend.

Weights split over other mesh axes too: a dim split over axes that also split the tokens (FSDP) is
all-gathered inside (its gradient is reduce-scattered by autodiff); the expert hidden dim F split
over axes that do not split the tokens (tensor parallelism) stays split and the partial outputs
are summed with `psum`.

Legend: B batch, T length (per shard inside the map), D model dim, E experts, k experts per token,
F expert ffn dim, P expert shards, R receive-buffer rows.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from mimo_jax.ops.moe.blocked import blocked_dispatch
from mimo_jax.ops.moe.local_choice import fastest_one_device_impl
from mimo_jax.ops.moe.ragged import ragged_dispatch
from mimo_jax.ops.spec_axes import collective_axis, pad_spec, spec_axes

TRANSPORTS = ("auto", "ragged_all_to_all", "all_to_all")


@dataclasses.dataclass(frozen=True)
class ExpertParallelOptions:
    """capacity_factor: receive buffer size in units of the balanced load; 0 = dropless.
    transport: "ragged_all_to_all", "all_to_all" (dense emulation) or "auto"."""

    capacity_factor: float = 0.0
    transport: str = "auto"

    def __post_init__(self):
        if self.capacity_factor < 0:
            raise ValueError(f"expert capacity_factor must be >= 0 (0 = dropless), "
                             f"got {self.capacity_factor}")
        if self.transport not in TRANSPORTS:
            raise ValueError(f"expert transport {self.transport!r} is not one of {TRANSPORTS}")


def _exclusive_cumsum(x: jax.Array, axis: int = 0) -> jax.Array:
    return jnp.cumsum(x, axis=axis) - x


def expert_quota(tokens: int, top_k: int, num_experts: int, capacity_factor: float) -> int | None:
    """The most copies one source shard of `tokens` local tokens sends one expert (None:
    dropless). Past T copies nothing is dropped: a token picks an expert at most once."""
    if capacity_factor == 0:
        return None
    return min(tokens, max(1, math.ceil(capacity_factor * tokens * top_k / num_experts)))


def receive_capacity(tokens: int, top_k: int, num_shards: int, experts_per_shard: int,
                     capacity_factor: float) -> int:
    """Rows R of one shard's receive buffer for `tokens` local tokens (see the module docstring)."""
    worst = num_shards * tokens * min(top_k, experts_per_shard)
    quota = expert_quota(tokens, top_k, num_shards * experts_per_shard, capacity_factor)
    if quota is None:
        return worst
    return min(worst, num_shards * experts_per_shard * quota)


def dropless_capacity_factor(top_k: int, num_experts: int) -> float:
    """The smallest capacity factor > 0 that can never drop a copy: a quota of T copies (every
    local token to the same expert), i.e. E / k."""
    return num_experts / top_k


def ragged_all_to_all_dense(operand: jax.Array, output: jax.Array, input_offsets: jax.Array,
                            send_sizes: jax.Array, output_offsets: jax.Array,
                            recv_sizes: jax.Array, *, axis_name, num_shards: int) -> jax.Array:
    """`jax.lax.ragged_all_to_all`'s contract with a dense `all_to_all` (any backend).

    Every shard packs the slices it sends to each destination into a [P, L, ...] buffer
    (L = min(operand rows, output rows)) together with the output row of each packed row, swaps
    them with `all_to_all`, and scatters the received rows into `output`. Same arguments and
    result as `ragged_all_to_all`; `recv_sizes` is implied by the senders and not read.
    """
    del recv_sizes
    rows, out_rows = operand.shape[0], output.shape[0]
    per_dest = input_offsets.shape[0] // num_shards
    length = min(rows, out_rows)
    sizes = send_sizes.reshape(num_shards, per_dest)
    ends = jnp.cumsum(sizes, axis=1)  # [P, S] packed end of each slice
    packed = jnp.arange(length, dtype=ends.dtype)
    slice_of_row = jax.vmap(lambda e: jnp.searchsorted(e, packed, side="right"))(ends)
    valid = packed[None, :] < ends[:, -1:]  # [P, L]
    slice_of_row = jnp.minimum(slice_of_row, per_dest - 1)
    within = packed[None, :] - jnp.take_along_axis(ends - sizes, slice_of_row, axis=1)
    source_row = jnp.take_along_axis(input_offsets.reshape(num_shards, per_dest), slice_of_row,
                                     axis=1) + within
    target_row = jnp.take_along_axis(output_offsets.reshape(num_shards, per_dest), slice_of_row,
                                     axis=1) + within
    target_row = jnp.where(valid, target_row, out_rows)  # out of range: dropped by the scatter
    shape = (1,) * (operand.ndim - 1)
    buffer = jnp.where(valid.reshape(valid.shape + shape),
                       jnp.take(operand, jnp.clip(source_row, 0, rows - 1), axis=0),
                       jnp.zeros((), operand.dtype))
    buffer = jax.lax.all_to_all(buffer, axis_name, 0, 0)  # [P (source), L, ...]
    target_row = jax.lax.all_to_all(target_row, axis_name, 0, 0)
    return output.at[target_row.reshape(-1)].set(
        buffer.reshape((-1,) + operand.shape[1:]), mode="drop")


def _transport(name: str):
    if name == "auto":
        name = "ragged_all_to_all" if jax.default_backend() in ("tpu", "gpu") else "all_to_all"
    if name == "ragged_all_to_all":
        return lambda *args, axis_name, num_shards: jax.lax.ragged_all_to_all(
            *args, axis_name=axis_name)
    return ragged_all_to_all_dense


def _local_experts(tokens, weights, indices, mask, w_gate, w_up, w_down, *, expert_axes,
                   capacity_factor: float, transport: str) -> tuple[jax.Array, jax.Array]:
    """The per-shard body: exchange, grouped matmuls, exchange back, combine.

    tokens [T, D]; weights, indices [T, k]; mask [T] bool; w_gate, w_up [E/P, D, F'];
    w_down [E/P, F', D] (F' = F or its local part). Returns [T, D] float32 and the number of
    this shard's copies that were dropped [] int32.
    """
    num_tokens, top_k = indices.shape
    local_experts = w_gate.shape[0]
    axis = collective_axis(expert_axes)
    num_shards = jax.lax.axis_size(axis)
    num_experts = local_experts * num_shards
    send = _transport(transport)

    # 1. Sort the copies by expert, and within an expert by falling gate weight (what a full
    #    quota keeps is the head of each slice); padding copies get expert id E and sort last,
    #    unsent.
    expert_of_copy = jnp.where(mask[:, None], indices, num_experts).reshape(-1)
    order = jnp.lexsort((-weights.reshape(-1), expert_of_copy))
    sorted_expert = expert_of_copy[order]
    counts = jnp.bincount(expert_of_copy, length=num_experts + 1)[:num_experts].astype(jnp.int32)
    token_of_copy = order // top_k
    sorted_copies = jnp.take(tokens, token_of_copy, axis=0)  # [T*k, D]
    send_offsets = _exclusive_cumsum(counts)  # [E]

    # 2. What each shard receives: accepted[s, l] copies from source s for local expert l (at
    #    most the quota), laid out expert-major then source.
    capacity = receive_capacity(num_tokens, top_k, num_shards, local_experts, capacity_factor)
    quota = expert_quota(num_tokens, top_k, num_experts, capacity_factor)
    incoming = jax.lax.all_to_all(counts, axis, 0, 0, tiled=True).reshape(num_shards,
                                                                          local_experts)
    accepted = incoming if quota is None else jnp.minimum(incoming, quota)
    dropped = jnp.sum(incoming - accepted).astype(jnp.int32)
    expert_start = _exclusive_cumsum(jnp.sum(accepted, axis=0))  # [E/P]
    receive_offsets = (expert_start[None, :] + _exclusive_cumsum(accepted, axis=0)).astype(
        jnp.int32)  # [P, E/P]
    accepted = accepted.astype(jnp.int32)
    group_sizes = jnp.sum(accepted, axis=0).astype(jnp.int32)  # [E/P]
    # The senders learn where their slices go and how much of each is accepted.
    send_sizes = jax.lax.all_to_all(accepted.reshape(-1), axis, 0, 0, tiled=True)
    target_offsets = jax.lax.all_to_all(receive_offsets.reshape(-1), axis, 0, 0, tiled=True)
    return_offsets = jax.lax.all_to_all(send_offsets, axis, 0, 0, tiled=True)

    # 3. Copies to their experts' shards.
    received = send(sorted_copies, jnp.zeros((capacity,) + tokens.shape[1:], tokens.dtype),
                    send_offsets, send_sizes, target_offsets, accepted.reshape(-1),
                    axis_name=axis, num_shards=num_shards)

    # 4. Local experts over contiguous groups; rows past the groups are zeroed.
    gate = jax.lax.ragged_dot(received, w_gate, group_sizes)
    up = jax.lax.ragged_dot(received, w_up, group_sizes)
    out = jax.lax.ragged_dot(jax.nn.silu(gate) * up, w_down, group_sizes)  # [R, D]
    filled = jnp.arange(capacity) < jnp.sum(group_sizes)
    out = jnp.where(filled[:, None], out, jnp.zeros((), out.dtype))

    # 5. Results back to the copies' home shards, in sorted order; dropped copies stay zero.
    returned = send(out, jnp.zeros_like(sorted_copies), receive_offsets.reshape(-1),
                    accepted.reshape(-1), return_offsets, send_sizes,
                    axis_name=axis, num_shards=num_shards)
    copy_weight = jnp.take(weights.reshape(-1), order) * (sorted_expert < num_experts)
    weighted = returned.astype(jnp.float32) * copy_weight[:, None]
    return jax.ops.segment_sum(weighted, token_of_copy, num_segments=num_tokens), dropped


def _expert_axes_and_sizes(weight_spec: P, mesh) -> tuple[tuple[str, ...], dict[str, int]]:
    """The mesh axes splitting the experts, and every axis's size (none without a mesh)."""
    mesh = jax.sharding.get_abstract_mesh() if mesh is None else mesh
    return spec_axes(pad_spec(weight_spec, 3)[0]), ({} if mesh.empty else dict(mesh.shape))


def _expert_shards(expert_axes: tuple[str, ...], sizes: dict[str, int]) -> int:
    return math.prod(sizes.get(a, 1) for a in expert_axes)


def splits_experts(weight_spec: P | None,
                   mesh: jax.sharding.Mesh | jax.sharding.AbstractMesh | None = None) -> bool:
    """Whether `weight_spec` (of w_gate [experts, embed, mlp]) splits the experts over mesh
    axes of more than one device in `mesh` (default: the current mesh)."""
    if weight_spec is None:
        return False
    return _expert_shards(*_expert_axes_and_sizes(weight_spec, mesh)) > 1


_LOCAL_DISPATCH = {"blocked": blocked_dispatch, "ragged": ragged_dispatch}


def dispatch(x: jax.Array, weights: jax.Array, indices: jax.Array, w_gate: jax.Array,
             w_up: jax.Array, w_down: jax.Array, *, token_mask: jax.Array | None,
             token_spec: P, weight_spec: P,
             options: ExpertParallelOptions,
             mesh: jax.sharding.Mesh | jax.sharding.AbstractMesh | None = None,
             with_drops: bool = False) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Expert-parallel routed experts. Returns [B, T, D] in x's dtype (and with `with_drops`,
    the number of token copies the capacity dropped, [] int32, summed over the mesh).

    Args:
      x: [B, T, D] tokens. weights, indices: [B, T, k] gate weights and expert ids (from
        `routing.route`). token_mask: [B, T] bool, False for padding (its output is zero and its
        copies are not sent); None = all real.
      w_gate, w_up: [E, D, F]; w_down: [E, F, D].
      token_spec: mesh PartitionSpec of x ([batch, length, embed] under the logical rules).
      weight_spec: mesh PartitionSpec of w_gate ([experts, embed, mlp]); its first entry names
        the mesh axes that split the experts.
      options: receive-buffer capacity and transport (the model's `RuntimeConfig`).
      mesh: defaults to the current mesh (`jax.sharding.get_abstract_mesh()`).
    Without a mesh, or when the experts are not split, this is the fastest local dropless
    dispatch for the backend (`local_choice`) with padding outputs zeroed: the same result.
    """
    y, dropped = _dispatch(x, weights, indices, w_gate, w_up, w_down, token_mask=token_mask,
                           token_spec=token_spec, weight_spec=weight_spec, options=options,
                           mesh=mesh)
    return (y, dropped) if with_drops else y


def _dispatch(x, weights, indices, w_gate, w_up, w_down, *, token_mask, token_spec, weight_spec,
              options, mesh):
    mesh = jax.sharding.get_abstract_mesh() if mesh is None else mesh
    b, t, d = x.shape
    if token_mask is None:
        token_mask = jnp.ones((b, t), bool)
    token_spec, weight_spec = pad_spec(token_spec, 3), pad_spec(weight_spec, 3)
    expert_axes, sizes = _expert_axes_and_sizes(weight_spec, mesh)
    if _expert_shards(expert_axes, sizes) == 1:
        local_dispatch = _LOCAL_DISPATCH[fastest_one_device_impl()]
        y = local_dispatch(x.reshape(b * t, d), weights.reshape(b * t, -1),
                           indices.reshape(b * t, -1), w_gate, w_up, w_down)
        y = jnp.where(token_mask[..., None], y.reshape(b, t, d), jnp.zeros((), x.dtype))
        return y, jnp.zeros((), jnp.int32)
    if w_gate.shape[0] % _expert_shards(expert_axes, sizes):
        raise ValueError(f"{w_gate.shape[0]} experts do not split over mesh axes {expert_axes} "
                         f"of sizes {[sizes[a] for a in expert_axes]}")

    token_axes = set(spec_axes(token_spec[0])) | set(spec_axes(token_spec[1]))
    if not set(expert_axes) <= token_axes:
        # Tokens whole on the expert axes: split the batch over them for the exchange, so each
        # expert shard sends a distinct part (the map's output is then split the same way).
        missing = tuple(a for a in expert_axes if a not in token_axes)
        if b % (math.prod(sizes[a] for a in spec_axes(token_spec[0])) * math.prod(
                sizes[a] for a in missing)):
            raise ValueError(f"batch {b} does not split over mesh axes "
                             f"{spec_axes(token_spec[0]) + missing} for expert parallelism")
        token_spec = P(spec_axes(token_spec[0]) + missing, token_spec[1], token_spec[2])
        token_axes |= set(missing)
    x_model_axes = spec_axes(token_spec[2])
    d_axes, f_axes = spec_axes(weight_spec[1]), spec_axes(weight_spec[2])
    # F stays split (partial sums + psum) only over axes that split neither tokens nor experts.
    f_split = () if (set(f_axes) & (token_axes | set(expert_axes))) else f_axes
    f_gather = tuple(a for a in f_axes if a not in f_split)

    def gather(w, axes, dim):
        return jax.lax.all_gather(w, collective_axis(axes), axis=dim, tiled=True) if axes else w

    def body(x, weights, indices, mask, w_gate, w_up, w_down):
        x = gather(x, x_model_axes, 2)
        bl, tl, _ = x.shape
        w_gate = gather(gather(w_gate, d_axes, 1), f_gather, 2)
        w_up = gather(gather(w_up, d_axes, 1), f_gather, 2)
        w_down = gather(gather(w_down, d_axes, 2), f_gather, 1)
        y, dropped = _local_experts(x.reshape(bl * tl, d), weights.reshape(bl * tl, -1),
                           indices.reshape(bl * tl, -1), mask.reshape(-1), w_gate, w_up, w_down,
                           expert_axes=expert_axes, capacity_factor=options.capacity_factor,
                           transport=options.transport)
        if f_split:
            y = jax.lax.psum(y, collective_axis(f_split))
        y = y.astype(x.dtype).reshape(bl, tl, d)
        if x_model_axes:
            part = d // math.prod(jax.lax.axis_size(a) for a in x_model_axes)
            y = jax.lax.dynamic_slice_in_dim(
                y, jax.lax.axis_index(collective_axis(x_model_axes)) * part, part, axis=2)
        # Each copy is counted once, by its receiver; shards that differ only outside the token
        # axes hold the same tokens and count the same copies.
        return y, jax.lax.psum(dropped, collective_axis(tuple(sorted(token_axes))))

    bt = P(token_spec[0], token_spec[1])
    routed = P(token_spec[0], token_spec[1], None)
    in_specs = (token_spec, routed, routed, bt, weight_spec, weight_spec,
                P(weight_spec[0], weight_spec[2], weight_spec[1]))
    mapped = jax.shard_map(body, mesh=mesh, in_specs=in_specs, out_specs=(token_spec, P()))
    return mapped(x, weights, indices, token_mask, w_gate, w_up, w_down)
