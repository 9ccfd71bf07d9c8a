"""MoE dispatch that reads only the chosen experts' weights: for decoding a few tokens.

Each token gathers its k experts' weight matrices ([T, k, D, F]) and multiplies by them, so a
step reads T*k experts' weights instead of all E: at batch 1 that is k of E (4 of 16 in the
tiny model, 8 of 256 in the full one), which is what bounds decoding speed. With many tokens
the gathered copies outgrow the expert table and the sorted dispatches win, so `api.dispatch`
picks this one by the token count (`reads_fewer_weights`).

Legend: T tokens, D model dim, E experts, k experts per token, F expert ffn dim.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def reads_fewer_weights(num_tokens: int, top_k: int, num_experts: int) -> bool:
    """Whether gathering each token's experts reads fewer weight bytes than every expert once."""
    return num_tokens * top_k < num_experts


def gathered_dispatch(x: jax.Array, weights: jax.Array, indices: jax.Array, w_gate: jax.Array,
                      w_up: jax.Array, w_down: jax.Array) -> jax.Array:
    """Each token through its own k experts, combined by gate weight.

    x: [T, D]; weights, indices: [T, k]; w_gate, w_up: [E, D, F]; w_down: [E, F, D]. Returns [T, D].
    """
    gate = jnp.einsum("td,tkdf->tkf", x, w_gate[indices], preferred_element_type=jnp.float32)
    up = jnp.einsum("td,tkdf->tkf", x, w_up[indices], preferred_element_type=jnp.float32)
    hidden = jax.nn.silu(gate) * up * weights[..., None].astype(jnp.float32)  # [T, k, F]
    return jnp.einsum("tkf,tkfd->td", hidden.astype(w_down.dtype), w_down[indices],
                      preferred_element_type=jnp.float32).astype(x.dtype)
