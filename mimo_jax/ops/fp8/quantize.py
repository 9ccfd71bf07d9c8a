"""Block-scaled e4m3 quantisation: a tensor becomes float8_e4m3fn values and one float32 scale
per tile, `x ~= values * scale` tile by tile.

A tile is given per dimension (`tile[i]` elements along dimension i; 1 = every element its own
tile along that dimension), so one function covers the recipe's three layouts:
  activations   1 x 128 along the contraction dimension,  e.g. tile (1, 128) for x [M, K]
  wgrad inputs  128 x 1 along the token dimension,        e.g. tile (128, 1) for x [M, K]
  weights       128 x 128 blocks,                          e.g. tile (1, 128, 128) for [E, D, F]
A dimension that is not a multiple of its tile ends in a partial tile (the tiny configs have
hidden sizes of 64 to 256): it is padded with zeros, which leave every tile maximum unchanged,
and the padding is cut off again.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp

E4M3 = jnp.float8_e4m3fn
E4M3_MAX = 448.0  # the largest finite float8_e4m3fn value (it has no infinities)
TILE = 128


class Quantized(NamedTuple):
    """values: e4m3, the input's shape; scales: float32, one per tile ([ceil(n_i / tile_i)])."""

    values: jax.Array
    scales: jax.Array


def _tiled(shape: Sequence[int], tile: Sequence[int]) -> tuple[int, ...]:
    return tuple(-(-n // t) for n, t in zip(shape, tile))


def _split_tiles(x: jax.Array, tile: Sequence[int]) -> jax.Array:
    """[n_0, ..., n_r] -> [c_0, t_0, ..., c_r, t_r], zero-padded to whole tiles."""
    counts = _tiled(x.shape, tile)
    x = jnp.pad(x, [(0, c * t - n) for n, c, t in zip(x.shape, counts, tile)])
    return x.reshape([d for c, t in zip(counts, tile) for d in (c, t)])


def _join_tiles(x: jax.Array, shape: Sequence[int]) -> jax.Array:
    """The inverse of `_split_tiles`: [c_0, t_0, ...] -> [n_0, ...], padding cut off."""
    padded = tuple(x.shape[2 * i] * x.shape[2 * i + 1] for i in range(len(shape)))
    return x.reshape(padded)[tuple(slice(0, n) for n in shape)]


def _expand_scales(scales: jax.Array) -> jax.Array:
    """[c_0, ..., c_r] -> [c_0, 1, ..., c_r, 1], to broadcast over `_split_tiles`' layout."""
    return scales.reshape([d for c in scales.shape for d in (c, 1)])


def power_of_two_scales(amax: jax.Array) -> jax.Array:
    """The smallest power of two s with amax / s <= E4M3_MAX (1 where amax is 0). float32.

    Why powers of two: dividing by one and multiplying back are exact in every binary float
    format, so the e4m3 cast is the only rounding of a quantise-dequantise round trip, and an
    e4m3 value times its scale is exactly representable in bfloat16 and float32 (3 mantissa bits
    fit in 7 and 23; the exponents stay far inside their range). A dequantised operand therefore
    carries exactly the value an FP8 tensor core would multiply.
    """
    amax = amax.astype(jnp.float32)
    # frexp: amax / 448 = m * 2^e with m in [0.5, 1); the scale is 2^e, or 2^(e-1) when the ratio
    # is itself a power of two (m == 0.5), so amax / scale lands in (224, 448].
    mantissa, exponent = jnp.frexp(amax / E4M3_MAX)
    exponent = jnp.where(mantissa == 0.5, exponent - 1, exponent)
    scales = jnp.ldexp(jnp.ones_like(amax), exponent)
    # An all-zero tile (or padding) gets scale 1: its values quantise to 0, never 0/0 = NaN.
    return jnp.where(amax > 0, scales, jnp.ones_like(amax))


def quantize(x: jax.Array, tile: Sequence[int]) -> Quantized:
    """x: any float array, tile: one size per dimension. Returns its e4m3 values and per-tile
    power-of-two scales (see the module docstring)."""
    if len(tile) != x.ndim or any(t < 1 for t in tile):
        raise ValueError(f"tile {tuple(tile)} must give a size >= 1 for each of x's {x.ndim} "
                         f"dimensions (shape {x.shape})")
    tiles = _split_tiles(x.astype(jnp.float32), tile)
    amax = jnp.max(jnp.abs(tiles), axis=tuple(range(1, tiles.ndim, 2)))
    scales = power_of_two_scales(amax)
    # The clip only guards the cast (e4m3fn turns overflow into NaN); by the choice of scale
    # |x / scale| <= 448 already, so it never changes a value.
    scaled = jnp.clip(tiles / _expand_scales(scales), -E4M3_MAX, E4M3_MAX)
    return Quantized(_join_tiles(scaled.astype(E4M3), x.shape), jax.lax.stop_gradient(scales))


def dequantize(q: Quantized, tile: Sequence[int], dtype=jnp.float32) -> jax.Array:
    """values * scale tile by tile, in `dtype` (exact in float32 and bfloat16, see
    `power_of_two_scales`). Returns the values' shape."""
    tiles = _split_tiles(q.values.astype(dtype), tile)
    return _join_tiles(tiles * _expand_scales(q.scales.astype(dtype)), q.values.shape)


def quantize_dequantize(x: jax.Array, tile: Sequence[int], dtype=None) -> jax.Array:
    """x rounded to its block-scaled e4m3 value, in `dtype` (default x's). No custom gradient:
    callers choose what the backward pass does (`mimo_jax.ops.fp8.experts`)."""
    return dequantize(quantize(x, tile), tile, x.dtype if dtype is None else dtype)


def activation_tile(ndim: int, axis: int = -1) -> tuple[int, ...]:
    """1 x 128 along `axis` (the contraction dimension), 1 along every other dimension."""
    tile = [1] * ndim
    tile[axis] = TILE
    return tuple(tile)


def weight_tile(ndim: int) -> tuple[int, ...]:
    """128 x 128 blocks over the last two dimensions; leading ones (experts) one at a time."""
    return (1,) * (ndim - 2) + (TILE, TILE)
