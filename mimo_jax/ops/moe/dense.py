"""Dense MoE dispatch: every expert on every token, combined with a [T, E] weight matrix.

E/k times the FLOPs of the routed computation, but plain einsums: the fastest choice on CPU at
small E, and the obviously-correct twin the other dispatch backends are held to.

Legend: T tokens, D model dim, E experts, k experts per token, F expert ffn dim.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def dense_dispatch(x: jax.Array, weights: jax.Array, indices: jax.Array, w_gate: jax.Array,
                   w_up: jax.Array, w_down: jax.Array) -> jax.Array:
    """Every expert on every token, combined by gate weight.

    x: [T, D]; weights, indices: [T, k]; w_gate, w_up: [E, D, F]; w_down: [E, F, D]. Returns [T, D].
    """
    num_experts = w_gate.shape[0]
    combine = jnp.sum(jax.nn.one_hot(indices, num_experts, dtype=jnp.float32) * weights[..., None],
                      axis=1)  # [T, E]
    gate = jnp.einsum("td,edf->tef", x, w_gate)
    up = jnp.einsum("td,edf->tef", x, w_up)
    # The down projection is linear, so the gate weights go in before it and one contraction over
    # (expert, ffn) replaces E per-expert products and a weighted sum of [T, E, D] outputs.
    hidden = (jax.nn.silu(gate) * up).astype(jnp.float32) * combine[..., None]  # [T, E, F]
    return jnp.einsum("tef,efd->td", hidden.astype(w_down.dtype), w_down,
                      preferred_element_type=jnp.float32).astype(x.dtype)
