"""ops.attention's entry point: "auto" resolution, the registry's names, argument errors. The
implementations themselves are held to the reference in test_implementations.py."""

import jax.numpy as jnp
import numpy as np
import pytest

from mimo_jax import config
from mimo_jax.ops import attention as attention_ops
from attention_inputs import random_inputs


def test_auto_is_chunked_on_cpu(seed):
    assert attention_ops.resolve_impl("auto") == "chunked"
    q, k, v, sinks, segment_ids, _ = random_inputs(seed, 1, 64, 2, 1, 16, 16)
    auto = attention_ops.attention(q, k, v, sinks=sinks, window=17, segment_ids=segment_ids)
    chunked = attention_ops.attention(q, k, v, sinks=sinks, window=17, segment_ids=segment_ids,
                                      impl="chunked")
    np.testing.assert_array_equal(np.asarray(auto), np.asarray(chunked))


def test_the_config_offers_exactly_the_registered_implementations():
    assert attention_ops.IMPLS == ("auto", "reference", "chunked", "pallas")
    assert set(config.ATTENTION_IMPLS) == set(attention_ops.IMPLS)


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
