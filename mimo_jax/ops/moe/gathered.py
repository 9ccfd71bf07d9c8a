"""MoE dispatch that reads only the chosen experts' weights: for decoding a few tokens.

Each token copy (token t's choice j) gathers its expert's weight matrices ([T*k, D, F]) and
multiplies by them, so a step reads T*k experts' weights instead of all E: at batch 1 that is k
of E (4 of 16 in the tiny model, 8 of 256 in the full one), which is what bounds decoding
speed. With many tokens the gathered copies outgrow the expert table and the sorted dispatches
win, so `api.dispatch` picks this one by the token count (`reads_fewer_weights`).

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
    num_tokens, top_k = indices.shape
    chosen = indices.reshape(-1)  # [T*k]: copy c is token c // k's choice c % k
    # One row per copy, so every product is a batched [1, D] x [D, F] over copies whose gathered
    # weights [T*k, D, F] are used in the layout they are read in. Contracting a [T, k, D, F]
    # gather per token instead made XLA:CPU transpose the gathered weights first, which halved
    # the speed of greedy decoding at batch 1.
    copies = jnp.repeat(x, top_k, axis=0)  # [T*k, D]
    gate = jnp.einsum("cd,cdf->cf", copies, w_gate[chosen], preferred_element_type=jnp.float32)
    up = jnp.einsum("cd,cdf->cf", copies, w_up[chosen], preferred_element_type=jnp.float32)
    hidden = jax.nn.silu(gate) * up * weights.reshape(-1, 1).astype(jnp.float32)  # [T*k, F]
    out = jnp.einsum("cf,cfd->cd", hidden.astype(w_down.dtype), w_down[chosen],
                     preferred_element_type=jnp.float32)  # [T*k, D]
    return jnp.sum(out.reshape(num_tokens, top_k, -1), axis=1).astype(x.dtype)
