"""Random attention inputs and the value-and-gradient check shared by the attention tests."""

import jax
import jax.numpy as jnp
import numpy as np


def random_inputs(seed: int, b: int, t: int, n: int, k: int, h: int, v: int, dtype=jnp.float32,
                  segments: bool = True):
    """q, k, v, sinks, segment_ids (packed documents then a padding tail, or None), cotangent."""
    rng = np.random.default_rng(seed)  # host draws: no per-shape compile of a random kernel

    def normal(*shape, dtype=jnp.float32):
        return jnp.asarray(rng.standard_normal(shape), dtype)

    q = normal(b, t, n, h, dtype=dtype)
    key = normal(b, t, k, h, dtype=dtype)
    value = normal(b, t, k, v, dtype=dtype)
    sinks = normal(n)
    cotangent = normal(b, t, n, v)
    segment_ids = packed_segments(rng, b, t) if segments else None
    return q, key, value, sinks, segment_ids, cotangent


def packed_segments(rng: np.random.Generator, b: int, t: int) -> jax.Array:
    """Each row: documents of random lengths with ids 1, 2, ..., then 0s (padding) at the end."""
    rows = []
    for _ in range(b):
        row, doc = [], 1
        real = int(rng.integers(t * 3 // 4, t))  # the rest is padding
        while len(row) < real:
            row += [doc] * int(rng.integers(1, max(2, t // 3)))
            doc += 1
        rows.append(row[:real] + [0] * (t - real))
    return jnp.asarray(rows, jnp.int32)


def relative_error(actual, expected) -> float:
    actual, expected = (np.asarray(x, np.float64) for x in (actual, expected))
    return float(np.max(np.abs(actual - expected)) / max(np.max(np.abs(expected)), 1e-30))


def output_and_grads(fn, q, k, v, sinks, segment_ids, cotangent, jit=jax.jit):
    """fn's output and the gradients (q, k, v, sinks) of <output, cotangent>, in one `jit`."""
    def run(q_, k_, v_, s_, segments, cot):
        out, pullback = jax.vjp(lambda *args: fn(*args, segments), q_, k_, v_, s_)
        return out, pullback(cot.astype(out.dtype))
    return jit(run)(q, k, v, sinks, segment_ids, cotangent)


def check_case(fn, reference_fn, inputs, *, sink: str, out_tol: float, grad_tol: float,
               seed: int, jit=jax.jit):
    """fn against reference_fn: outputs, dq, dk, dv, dsinks; padding rows exactly zero.

    sink="-inf": fn gets sinks of -inf and the reference gets no sinks at all (and dsinks = 0).
    jit: how fn's program is compiled (e.g. on a mesh); the reference's is plain `jax.jit`.
    """
    q, k, v, sinks, segment_ids, cotangent = inputs
    if sink == "-inf":
        sinks = jnp.full_like(sinks, -jnp.inf)
        reference_fn = _without_sinks(reference_fn)
    out, grads = output_and_grads(fn, q, k, v, sinks, segment_ids, cotangent, jit)
    want, want_grads = output_and_grads(reference_fn, q, k, v, sinks, segment_ids, cotangent)
    err = relative_error(out, want)
    assert err <= out_tol, f"output error {err:.2e} > {out_tol} (seed {seed})"
    for name, got, expected in zip(("dq", "dk", "dv", "dsinks"), grads, want_grads):
        err = relative_error(got, expected)
        assert err <= grad_tol, f"{name} error {err:.2e} > {grad_tol} (seed {seed})"
    if segment_ids is not None:
        padding = np.asarray(segment_ids) == 0
        assert padding.any()
        np.testing.assert_array_equal(np.asarray(out)[padding], 0.0)
        np.testing.assert_array_equal(np.asarray(grads[0])[padding], 0.0)


def _without_sinks(fn):
    return lambda q, k, v, sinks, segment_ids: fn(q, k, v, None, segment_ids)
