"""Block-scaled e4m3 quantisation and the FP8 GEMM, held to a numpy reference (ml_dtypes' e4m3
cast, float64 products) on random inputs with fixed seeds.

Tolerances: quantised values and scales bit-equal to numpy's; GEMM values and gradients within
1e-6 of the reference's largest entry (float32 accumulation against float64); against the
unquantised product, a relative (Frobenius) error between 2^-8 and 2^-4 (e4m3 keeps 3 mantissa
bits: rounding is at most 2^-4 relative per element, and random errors partly cancel).
"""

import chex
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from mimo_jax.ops import fp8

E4M3_NP = ml_dtypes.float8_e4m3fn


def _random(shape, seed, spread=3.0):
    """Normal entries whose rows span 10^-spread .. 10^spread in magnitude (never zero)."""
    rng = np.random.default_rng(seed)
    rows = 10.0 ** rng.uniform(-spread, spread, size=shape[:-1] + (1,))
    return (rng.standard_normal(shape) * rows).astype(np.float32)


def _np_quantize(x, tile):
    """numpy twin of `fp8.quantize`: e4m3 values (as float64) and power-of-two scales."""
    x = np.asarray(x, np.float64)
    counts = [-(-n // t) for n, t in zip(x.shape, tile)]
    values = np.zeros_like(x)
    scales = np.ones(counts)
    for index in np.ndindex(*counts):
        sl = tuple(slice(i * t, (i + 1) * t) for i, t in zip(index, tile))
        amax = np.abs(x[sl]).max()
        if amax > 0:
            scales[index] = 2.0 ** np.ceil(np.log2(amax / 448.0))
        values[sl] = (x[sl] / scales[index]).astype(E4M3_NP).astype(np.float64)
    return values, scales


def _np_dequantize(x, tile):
    values, scales = _np_quantize(x, tile)
    for index in np.ndindex(*scales.shape):
        sl = tuple(slice(i * t, (i + 1) * t) for i, t in zip(index, tile))
        values[sl] *= scales[index]
    return values


@pytest.mark.parametrize("shape,tile", [((5, 300), (1, 128)), ((300, 7), (128, 1)),
                                        ((200, 130), (128, 128)), ((3, 64, 96), (1, 128, 128))])
def test_quantize_matches_numpy(shape, tile):
    x = _random(shape, seed=sum(shape))
    q = fp8.quantize(jnp.asarray(x), tile)
    chex.assert_shape(q.values, shape)
    chex.assert_shape(q.scales, tuple(-(-n // t) for n, t in zip(shape, tile)))
    assert q.values.dtype == jnp.float8_e4m3fn and q.scales.dtype == jnp.float32
    values, scales = _np_quantize(x, tile)
    np.testing.assert_array_equal(np.asarray(q.values, np.float64), values)
    np.testing.assert_array_equal(np.asarray(q.scales, np.float64), scales)


def test_round_trip_properties():
    x = _random((6, 260), seed=1)
    x[2, 128:256] = 0.0  # one all-zero tile
    tile = (1, 128)
    q = fp8.quantize(jnp.asarray(x), tile)
    scales = np.asarray(q.scales)
    # Powers of two: frexp's mantissa is exactly 0.5.
    assert np.all(np.frexp(scales)[0] == 0.5)
    values = np.asarray(q.values.astype(jnp.float32))
    assert np.all(np.isfinite(values))
    # Every tile's largest value lands in [224, 448]: before rounding it is in (224, 448] by the
    # choice of scale (the e4m3 range is used, nothing overflows); rounding may reach 224.
    for row in range(6):
        for col in range(3):
            tile_max = np.abs(values[row, col * 128:(col + 1) * 128]).max()
            if row == 2 and col == 1:
                assert tile_max == 0.0 and scales[row, col] == 1.0
            else:
                assert 224.0 <= tile_max <= 448.0
    back = np.asarray(fp8.dequantize(q, tile))
    assert not np.any(np.isnan(back))
    np.testing.assert_array_equal(back[2, 128:256], 0.0)
    # Error bound per element: 2^-4 relative for normal e4m3 values, half the subnormal step
    # (2^-10 times the scale) below them.
    step = np.repeat(scales, 128, axis=1)[:, :260] * 2.0 ** -10
    assert np.all(np.abs(back - x) <= np.maximum(2.0 ** -4 * np.abs(x), step))
    # A second round trip changes nothing: the dequantised values are block-scaled e4m3 already
    # (a tile whose maximum rounded to 224 may come back at half the scale, same products).
    again = fp8.quantize_dequantize(jnp.asarray(back), tile)
    np.testing.assert_array_equal(np.asarray(again), back)


def test_dequantize_is_exact_in_bfloat16():
    q = fp8.quantize(jnp.asarray(_random((4, 300), seed=2)), (1, 128))
    in_bf16 = fp8.dequantize(q, (1, 128), jnp.bfloat16)
    assert in_bf16.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(in_bf16, np.float32),
                                  np.asarray(fp8.dequantize(q, (1, 128))))


@jax.jit
def _matmul_and_grads(x, w, dy):
    """fp8_matmul's output and its gradients for the output gradient dy (one compiled program)."""
    y, vjp = jax.vjp(fp8.fp8_matmul, x, w)
    return (y,) + vjp(dy)


def _gemm_case(m=70, k=200, n=150):
    x = _random((m, k), seed=3, spread=1.0)
    w = (0.02 * np.random.default_rng(4).standard_normal((k, n))).astype(np.float32)
    dy = _random((m, n), seed=5, spread=1.0)
    return x, w, dy


def test_fp8_matmul_matches_numpy_reference():
    x, w, dy = _gemm_case()
    y, dx, dw = _matmul_and_grads(jnp.asarray(x), jnp.asarray(w), jnp.asarray(dy))
    want_y = _np_dequantize(x, (1, 128)) @ _np_dequantize(w, (128, 128))
    want_dx = _np_dequantize(dy, (1, 128)) @ _np_dequantize(w, (128, 128)).T
    want_dw = _np_dequantize(x, (128, 1)).T @ _np_dequantize(dy, (128, 1))
    for got, want in ((y, want_y), (dx, want_dx), (dw, want_dw)):
        chex.assert_shape(got, want.shape)
        assert np.max(np.abs(np.asarray(got) - want)) <= 1e-6 * np.max(np.abs(want))
    # The library's own reference agrees with the forward too.
    np.testing.assert_allclose(np.asarray(fp8.reference_matmul(jnp.asarray(x), jnp.asarray(w))),
                               want_y, rtol=0, atol=1e-6 * np.max(np.abs(want_y)))


def test_fp8_matmul_error_against_exact_product():
    x, w, dy = _gemm_case()
    y, dx, dw = _matmul_and_grads(jnp.asarray(x), jnp.asarray(w), jnp.asarray(dy))
    x64, w64, dy64 = (a.astype(np.float64) for a in (x, w, dy))
    for got, exact in ((y, x64 @ w64), (dx, dy64 @ w64.T), (dw, x64.T @ dy64)):
        error = np.linalg.norm(np.asarray(got) - exact) / np.linalg.norm(exact)
        assert 2.0 ** -8 < error < 2.0 ** -4, error


def test_fp8_matmul_in_bfloat16():
    x, w, dy = _gemm_case()
    xb = jnp.asarray(x).astype(jnp.bfloat16)
    y, dx, dw = _matmul_and_grads(xb, jnp.asarray(w), jnp.asarray(dy).astype(jnp.bfloat16))
    # Output and dgrad in the compute dtype, wgrad in the master weights' float32.
    assert (y.dtype, dx.dtype, dw.dtype) == (jnp.bfloat16, jnp.bfloat16, jnp.float32)
    want_y = _np_dequantize(np.asarray(xb, np.float32), (1, 128)) @ _np_dequantize(w, (128, 128))
    # float32 accumulation, one bfloat16 rounding of the result (2^-8 relative).
    np.testing.assert_allclose(np.asarray(y, np.float32), want_y, rtol=2.0 ** -8,
                               atol=1e-6 * np.max(np.abs(want_y)))


def test_fp8_project_is_the_flattened_matmul():
    x = jnp.asarray(_random((2, 5, 64), seed=6, spread=1.0))
    w = jnp.asarray(_random((64, 4, 24), seed=7, spread=0.5))
    y = jax.jit(fp8.fp8_project)(x, w)
    chex.assert_shape(y, (2, 5, 4, 24))
    flat = jax.jit(fp8.fp8_matmul)(x.reshape(10, 64), w.reshape(64, 96))
    np.testing.assert_array_equal(np.asarray(y), np.asarray(flat).reshape(2, 5, 4, 24))


def test_expert_quantisers():
    w = jnp.asarray(_random((3, 64, 160), seed=8, spread=1.0))
    x = jnp.asarray(_random((2, 5, 64), seed=9, spread=1.0))
    g = jnp.asarray(_random((2, 5, 64), seed=10, spread=1.0))
    wq, w_vjp = jax.jit(lambda w: jax.vjp(fp8.expert_weights, w))(w)
    # Each expert is its own 128x128-block quantisation; the gradient passes unchanged.
    for e in range(3):
        np.testing.assert_array_equal(np.asarray(wq[e]),
                                      _np_dequantize(np.asarray(w[e]), (128, 128)))
    np.testing.assert_array_equal(np.asarray(w_vjp(g[0, :3, :, None] * jnp.ones(160))[0]),
                                  np.asarray(g[0, :3, :, None] * jnp.ones(160)))
    xq, x_vjp = jax.jit(lambda x: jax.vjp(fp8.expert_tokens, x))(x)
    np.testing.assert_array_equal(np.asarray(xq).reshape(10, 64),
                                  _np_dequantize(np.asarray(x).reshape(10, 64), (1, 128)))
    np.testing.assert_array_equal(np.asarray(x_vjp(g)[0]), np.asarray(g))
    y, y_vjp = jax.jit(lambda x: jax.vjp(fp8.expert_output, x))(x)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(x))
    np.testing.assert_array_equal(np.asarray(y_vjp(g)[0]).reshape(10, 64),
                                  _np_dequantize(np.asarray(g).reshape(10, 64), (1, 128)))


def test_bad_tile_is_rejected():
    with pytest.raises(ValueError, match="tile"):
        fp8.quantize(jnp.ones((4, 4)), (128,))
