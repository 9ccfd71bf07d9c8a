"""ops.attention: the chunked XLA path and the dispatcher, held to the dense reference.

Inputs are fresh random draws each run (the seed is in every failure message); errors are measured
as max |actual - expected| / max |expected| per array.
"""

import jax.numpy as jnp
import numpy as np
import pytest

from mimo_jax.ops import attention as attention_ops
from attention_inputs import check_case, random_inputs, relative_error


def _impl(name: str, window, chunk_size: int = 128):
    def fn(q, k, v, sinks, segment_ids):
        return attention_ops.attention(q, k, v, sinks=sinks, window=window,
                                       segment_ids=segment_ids, impl=name, chunk_size=chunk_size)
    return fn


# (window, GQA ratio, sink, segments); T = 300 is not a multiple of the 128 chunk. Window 1 keeps
# a real sink: without one, dq and dk are exactly zero there and relative errors mean nothing.
CHUNKED_CASES = [(1, 8, "random", True), (64, 16, "-inf", True), (128, 8, "random", False),
                 (129, 16, "random", True), ("T", 8, "-inf", True)]


@pytest.mark.parametrize("window, group, sink, segments", CHUNKED_CASES)
def test_chunked_matches_reference(seed, window, group, sink, segments):
    t = 300
    window = t if window == "T" else window
    inputs = random_inputs(seed, 2, t, group, 1, 32, 16, segments=segments)
    check_case(_impl("chunked", window), _impl("reference", window), inputs, sink=sink,
               out_tol=1e-5, grad_tol=1e-4, seed=seed)


def test_chunked_full_causal_and_realistic_head_dims(seed):
    """Window None with q/k head dim 192 and v head dim 128, as in the full model."""
    inputs = random_inputs(seed, 1, 200, 4, 2, 192, 128)
    check_case(_impl("chunked", None, chunk_size=64), _impl("reference", None), inputs,
               sink="random", out_tol=1e-5, grad_tol=1e-4, seed=seed)


def test_chunked_bf16(seed):
    inputs = random_inputs(seed, 2, 260, 8, 1, 64, 32, dtype=jnp.bfloat16)
    check_case(_impl("chunked", 129), _impl("reference", 129), inputs, sink="random",
               out_tol=2e-2, grad_tol=2e-2, seed=seed)


def test_first_token_of_a_document_is_its_value_scaled_by_one_minus_the_sink_weight(seed):
    """The sink semantics by hand: a document's first token sees only itself."""
    q, k, v, sinks, segment_ids, _ = random_inputs(seed, 1, 64, 2, 1, 16, 16)
    out = attention_ops.attention(q, k, v, sinks=sinks, window=9, segment_ids=segment_ids,
                                  impl="chunked", chunk_size=32)
    logit = np.einsum("nh,h->n", np.asarray(q[0, 0]), np.asarray(k[0, 0, 0])) * 16 ** -0.5
    weight = 1.0 / (1.0 + np.exp(np.asarray(sinks) - logit))
    np.testing.assert_allclose(np.asarray(out[0, 0]), weight[:, None] * np.asarray(v[0, 0, 0]),
                               rtol=1e-5, atol=1e-6)


def test_auto_is_chunked_on_cpu(seed):
    q, k, v, sinks, segment_ids, _ = random_inputs(seed, 1, 64, 2, 1, 16, 16)
    auto = attention_ops.attention(q, k, v, sinks=sinks, window=17, segment_ids=segment_ids)
    chunked = attention_ops.attention(q, k, v, sinks=sinks, window=17, segment_ids=segment_ids,
                                      impl="chunked")
    np.testing.assert_array_equal(np.asarray(auto), np.asarray(chunked))


def test_pallas_impl_dispatches_to_the_kernel(seed):
    q, k, v, sinks, segment_ids, _ = random_inputs(seed, 1, 40, 2, 1, 16, 16)
    out = attention_ops.attention(q, k, v, sinks=sinks, window=9, segment_ids=segment_ids,
                                  impl="pallas")
    want = attention_ops.attention(q, k, v, sinks=sinks, window=9, segment_ids=segment_ids,
                                   impl="reference")
    assert relative_error(out, want) <= 1e-5


@pytest.mark.parametrize("kwargs, message", [
    (dict(impl="flash"), "impl 'flash'"),
    (dict(window=0), "window must be >= 1"),
    (dict(sinks=jnp.zeros(3)), "sinks must have shape"),
    (dict(segment_ids=jnp.ones((1, 7), jnp.int32)), "segment_ids must have shape"),
])
def test_bad_arguments_raise(kwargs, message):
    q = jnp.ones((1, 8, 4, 16))
    k = v = jnp.ones((1, 8, 2, 16))
    with pytest.raises(ValueError, match=message):
        attention_ops.attention(q, k, v, **kwargs)


def test_bad_shapes_raise():
    with pytest.raises(ValueError, match="not a multiple of KV heads"):
        attention_ops.attention(jnp.ones((1, 8, 3, 16)), jnp.ones((1, 8, 2, 16)),
                                jnp.ones((1, 8, 2, 16)))
    with pytest.raises(ValueError, match="shapes disagree"):
        attention_ops.attention(jnp.ones((1, 8, 4, 16)), jnp.ones((1, 8, 2, 8)),
                                jnp.ones((1, 8, 2, 16)))
