"""RoPE, RMSNorm, per-document positions and the MTP shift against plain numpy."""

import jax
import jax.numpy as jnp
import numpy as np

from mimo_jax.model.layers import RMSNorm, apply_partial_rope
from mimo_jax.model.mtp import shift_left
from mimo_jax.model.transformer import positions_from_segments


def test_partial_neox_rope_matches_numpy():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 5, 3, 12)).astype(np.float32)
    positions = rng.integers(0, 1000, size=(2, 5))
    rope_dim, theta = 8, 640_000.0
    got = np.asarray(apply_partial_rope(jnp.asarray(x), jnp.asarray(positions), rope_dim, theta))
    inv = theta ** (-np.arange(0, rope_dim, 2) / rope_dim)
    ref = x.copy()
    for b in range(2):
        for t in range(5):
            ang = positions[b, t] * inv
            cos, sin = np.concatenate([np.cos(ang)] * 2), np.concatenate([np.sin(ang)] * 2)
            rot = x[b, t, :, :rope_dim]
            half = np.concatenate([-rot[:, rope_dim // 2:], rot[:, :rope_dim // 2]], axis=-1)
            ref[b, t, :, :rope_dim] = rot * cos + half * sin
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(got[..., rope_dim:], x[..., rope_dim:])  # the pass-through dims


def test_rope_depends_only_on_relative_position():
    rng = np.random.default_rng(1)
    q, k = (jnp.asarray(rng.normal(size=(1, 1, 1, 16)), jnp.float32) for _ in range(2))

    def score(qpos, kpos):
        rq = apply_partial_rope(q, jnp.array([[qpos]]), 16, 10_000.0)
        rk = apply_partial_rope(k, jnp.array([[kpos]]), 16, 10_000.0)
        return float(jnp.sum(rq * rk))

    np.testing.assert_allclose(score(7, 3), score(107, 103), rtol=1e-4)


def test_rmsnorm_matches_numpy():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(3, 7)).astype(np.float32) * 5
    norm = RMSNorm(1e-5)
    params = norm.init(jax.random.PRNGKey(0), x)
    params = jax.tree.map(lambda w: w + jnp.arange(7.0) / 10, params)
    got = norm.apply(params, x)
    ref = x / np.sqrt((x ** 2).mean(-1, keepdims=True) + 1e-5) * (1 + np.arange(7) / 10)
    np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-5)


def test_positions_restart_at_each_document():
    segments = jnp.array([[1, 1, 1, 2, 2, 3, 0, 0], [1, 1, 1, 1, 1, 1, 1, 1]])
    np.testing.assert_array_equal(np.asarray(positions_from_segments(segments)),
                                  [[0, 1, 2, 0, 1, 0, 0, 0], [0, 1, 2, 3, 4, 5, 6, 7]])


def test_mtp_shift_stops_at_document_boundaries():
    tokens = jnp.array([[11, 12, 13, 21, 22, 23, 24, 0]])
    segments = jnp.array([[1, 1, 1, 2, 2, 2, 2, 0]])
    for shift in (1, 2, 3):
        got, valid = shift_left(tokens, segments, shift, fill=-1)
        ref, ref_valid = [], []
        for t in range(8):
            ok = t + shift < 8 and segments[0, t] != 0 and segments[0, t + shift] == segments[0, t]
            ref.append(int(tokens[0, t + shift]) if ok else -1)
            ref_valid.append(bool(ok))
        np.testing.assert_array_equal(np.asarray(got[0]), ref)
        np.testing.assert_array_equal(np.asarray(valid[0]), ref_valid)
