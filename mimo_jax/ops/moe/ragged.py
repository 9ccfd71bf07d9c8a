"""Dropless sorted MoE dispatch: token copies sorted by expert, `jax.lax.ragged_dot` over contiguous
groups, unsorted, weighted and summed. Every copy is computed, whatever the load.

Legend: T tokens, D model dim, E experts, k experts per token, F expert ffn dim.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def sort_by_expert(indices: jax.Array, num_experts: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Orders the T*k token copies by expert.

    indices: [T, k]. Returns order [T*k] (copy ids sorted by expert; copy c is token c // k),
    group_sizes [E] int32 (copies per expert), and the sorted expert id of each copy [T*k].
    """
    flat = indices.reshape(-1)
    order = jnp.argsort(flat, stable=True)
    group_sizes = jnp.bincount(flat, length=num_experts).astype(jnp.int32)
    return order, group_sizes, flat[order]


def ragged_dispatch(x: jax.Array, weights: jax.Array, indices: jax.Array, w_gate: jax.Array,
                    w_up: jax.Array, w_down: jax.Array) -> jax.Array:
    """Dropless sorted dispatch with grouped matmuls. Same contract as `dense.dense_dispatch`."""
    num_tokens, top_k = indices.shape
    order, group_sizes, _ = sort_by_expert(indices, w_gate.shape[0])
    token_of_copy = order // top_k
    xs = jnp.take(x, token_of_copy, axis=0)  # [T*k, D]
    gate = jax.lax.ragged_dot(xs, w_gate, group_sizes)
    up = jax.lax.ragged_dot(xs, w_up, group_sizes)
    out = jax.lax.ragged_dot(jax.nn.silu(gate) * up, w_down, group_sizes)  # [T*k, D]
    copy_weight = jnp.take(weights.reshape(-1), order)
    weighted = out.astype(jnp.float32) * copy_weight[:, None]
    combined = jax.ops.segment_sum(weighted, token_of_copy, num_segments=num_tokens)
    return combined.astype(x.dtype)
