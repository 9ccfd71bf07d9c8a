"""The FP8 GEMM of the dense projections: y = x @ w from block-scaled e4m3 operands, float32
accumulation, in the forward pass and in both backward GEMMs (DeepSeek-V3's recipe).

  forward  y  = Q(x; 1x128 along K) @ Q(w; 128x128)                    [M, K] x [K, N]
  dgrad    dx = Q(dy; 1x128 along N) @ Q(w; 128x128)^T                 [M, N] x [N, K]
  wgrad    dw = Q(x; 128x1 along M)^T @ Q(dy; 128x1 along M)           [K, M] x [M, N]
Q(.) is `quantize.quantize` (e4m3 values, power-of-two scales per tile). Each product runs as
the dequantised operands (exact: see `quantize.power_of_two_scales`) multiplied in the compute
dtype with `preferred_element_type=float32`. The products of two e4m3 values are exact in
float32 and bfloat16 alike, so this is the arithmetic of an FP8 GEMM with float32 accumulation;
what it is not is the speed of one, which needs a block-scaled FP8 tensor-core kernel.
The backward pass keeps x as its 128x1-quantised e4m3 values (1 byte per element plus a scale
per 128) and w as its 128x128-quantised values, not x itself.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from mimo_jax.ops.fp8.quantize import TILE, dequantize, quantize

ACTIVATION = (1, TILE)  # [M, K] activations and [M, N] output gradients, along the contraction
TOKENS = (TILE, 1)  # wgrad's operands, along the token dimension M (its contraction)
WEIGHT = (TILE, TILE)


def _product(a: jax.Array, b: jax.Array) -> jax.Array:
    """a [M, K] @ b [K, N] accumulated in float32."""
    return jax.lax.dot_general(a, b, (((1,), (0,)), ((), ())),
                               preferred_element_type=jnp.float32)


def _forward(x, w):
    xq, wq = quantize(x, ACTIVATION), quantize(w, WEIGHT)
    y = _product(dequantize(xq, ACTIVATION, x.dtype), dequantize(wq, WEIGHT, x.dtype))
    return y.astype(x.dtype), wq


@jax.custom_vjp
def fp8_matmul(x: jax.Array, w: jax.Array) -> jax.Array:
    """x [M, K] (compute dtype) @ w [K, N] (any float dtype, e.g. float32 master weights) ->
    [M, N] in x's dtype, every GEMM from e4m3 operands (see the module docstring)."""
    return _forward(x, w)[0]


def _fp8_matmul_fwd(x, w):
    y, wq = _forward(x, w)
    # The zero-size arrays carry the input dtypes (residuals must be arrays).
    return y, (quantize(x, TOKENS), wq, jnp.zeros((0,), x.dtype), jnp.zeros((0,), w.dtype))


def _fp8_matmul_bwd(residuals, dy):
    x_tokens, wq, x_like, w_like = residuals
    compute = x_like.dtype
    dy_rows = dequantize(quantize(dy, ACTIVATION), ACTIVATION, compute)
    dx = _product(dy_rows, dequantize(wq, WEIGHT, compute).T)
    dy_tokens = dequantize(quantize(dy, TOKENS), TOKENS, compute)
    dw = _product(dequantize(x_tokens, TOKENS, compute).T, dy_tokens)
    return dx.astype(compute), dw.astype(w_like.dtype)


fp8_matmul.defvjp(_fp8_matmul_fwd, _fp8_matmul_bwd)


def reference_matmul(x: jax.Array, w: jax.Array) -> jax.Array:
    """The plain definition of `fp8_matmul`'s forward: quantise, dequantise into float32, matmul
    at full precision. For tests."""
    xq = dequantize(quantize(x, ACTIVATION), ACTIVATION)
    wq = dequantize(quantize(w, WEIGHT), WEIGHT)
    return jnp.matmul(xq, wq, precision=jax.lax.Precision.HIGHEST)


def fp8_project(x: jax.Array, w: jax.Array) -> jax.Array:
    """x [..., K] times w [K, *out] -> [..., *out] through `fp8_matmul` (w's trailing dims are
    one GEMM's N, so its 128x128 blocks are taken over [K, prod(out)])."""
    k, out = w.shape[0], w.shape[1:]
    if x.shape[-1] != k:
        raise ValueError(f"x's last dimension {x.shape[-1]} must match w's first {k}")
    y = fp8_matmul(x.reshape(-1, k), w.reshape(k, int(np.prod(out))))
    return y.reshape(x.shape[:-1] + out)


__all__ = ["ACTIVATION", "TOKENS", "WEIGHT", "fp8_matmul", "fp8_project", "reference_matmul"]
