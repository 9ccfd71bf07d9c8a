"""FP8 for the routed experts, applied around `mimo_jax.ops.moe.dispatch` so that every dispatch
backend (dense, ragged, blocked, gathered, expert_parallel) computes the same quantised math.

Three custom-VJP functions, each the identity in one direction:
  expert_weights(w)    forward: w [E, A, B] rounded to e4m3 per expert in 128x128 blocks;
                       backward: the gradient passes to the master weight unchanged.
  expert_tokens(x)     forward: x [..., D] rounded to e4m3 in 1x128 tiles along D;
                       backward: unchanged.
  expert_output(y)     forward: unchanged; backward: the gradient dy [..., D] rounded to e4m3
                       in 1x128 tiles along D.
What reaches the expert GEMMs as e4m3 values, block-scaled (the dispatches multiply the
rounded values in the compute dtype with float32 accumulation, see `matmul.py`):
  forward   gate/up: tokens and weights both; down: weights only (its input silu(g) * u is
            formed inside the dispatch and stays in the compute dtype).
  backward  down dgrad (dh = dy_copy @ w_down^T): both; a copy's cotangent is its gate weight
            times the token's rounded dy, i.e. e4m3 values with scale (2^j * gate weight) per tile.
            down wgrad (h^T @ dy_copy): dy_copy only, tiled along D rather than along the tokens
            (the 128x1 tiles of the dense GEMMs' wgrad would need the dispatch's copy layout).
            gate/up dgrad: the weights only; gate/up wgrad: the tokens only (1x128 along D).
Quantising the remaining operands needs a hook inside each dispatch; this module keeps FP8 out
of the five backends instead.
"""

from __future__ import annotations

import jax

from mimo_jax.ops.fp8.quantize import activation_tile, quantize_dequantize, weight_tile


@jax.custom_vjp
def expert_weights(w: jax.Array) -> jax.Array:
    """w [E, A, B] -> its e4m3 value per expert in 128x128 blocks over [A, B], w's dtype."""
    return quantize_dequantize(w, weight_tile(w.ndim))


expert_weights.defvjp(lambda w: (expert_weights(w), None), lambda _, g: (g,))


@jax.custom_vjp
def expert_tokens(x: jax.Array) -> jax.Array:
    """x [..., D] -> its e4m3 value in 1x128 tiles along D, x's dtype."""
    return quantize_dequantize(x, activation_tile(x.ndim))


expert_tokens.defvjp(lambda x: (expert_tokens(x), None), lambda _, g: (g,))


@jax.custom_vjp
def expert_output(y: jax.Array) -> jax.Array:
    """y [..., D] unchanged; its gradient is rounded to e4m3 in 1x128 tiles along D."""
    return y


def _output_bwd(_, g):
    return (quantize_dequantize(g, activation_tile(g.ndim)),)


expert_output.defvjp(lambda y: (y, None), _output_bwd)
