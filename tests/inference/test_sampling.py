"""Sampling filters against a plain numpy definition, and the samplers' distributions."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mimo_jax.inference.sampling import (SamplingConfig, filter_logits, probabilities, sample,
                                         sample_from_probs)


def _numpy_filtered_probs(logits: np.ndarray, temperature: float, top_k: int,
                          top_p: float) -> np.ndarray:
    """One row at a time: temperature, then top-k, then top-p by walking the sorted tokens."""
    out = np.zeros_like(logits, dtype=np.float64)
    for r, row in enumerate(logits.astype(np.float64) / temperature):
        keep = np.ones(row.shape, bool)
        if 0 < top_k < row.size:
            keep &= row >= np.sort(row)[::-1][top_k - 1]
        probs = np.where(keep, np.exp(row - row.max()), 0.0)
        probs /= probs.sum()
        if top_p < 1:
            order = np.argsort(-probs, kind="stable")
            total, smallest = 0.0, None
            for i in order:
                if total >= top_p:
                    break
                total += probs[i]
                smallest = probs[i]
            keep &= probs >= smallest
            probs = np.where(keep, probs, 0.0)
            probs /= probs.sum()
        out[r] = probs
    return out


@pytest.mark.parametrize("temperature,top_k,top_p", [
    (1.0, 0, 1.0), (0.7, 5, 1.0), (1.3, 0, 0.8), (0.9, 12, 0.6), (1.0, 1, 1.0), (2.0, 0, 0.05),
])
def test_filters_match_numpy(temperature, top_k, top_p):
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(6, 40)).astype(np.float32) * 2
    logits[0, 3] = logits[0, 7] = logits[0].max() + 1  # a tie at the top
    config = SamplingConfig(temperature, top_k, top_p)
    got = np.asarray(probabilities(jnp.asarray(logits), config))
    expected = _numpy_filtered_probs(logits, temperature, top_k, top_p)
    np.testing.assert_allclose(got, expected, atol=1e-6)
    np.testing.assert_array_equal(np.isneginf(np.asarray(filter_logits(jnp.asarray(logits),
                                                                       config))),
                                  expected == 0)


def test_greedy_is_argmax_and_one_hot():
    logits = jnp.asarray(np.random.default_rng(1).normal(size=(3, 9)), jnp.float32)
    config = SamplingConfig()
    assert config.greedy
    np.testing.assert_array_equal(sample(jax.random.key(0), logits, config),
                                  np.argmax(np.asarray(logits), axis=-1))
    np.testing.assert_array_equal(probabilities(logits, config),
                                  np.eye(9)[np.argmax(np.asarray(logits), axis=-1)])


def test_samples_follow_filtered_distribution():
    logits = jnp.asarray(np.random.default_rng(2).normal(size=(1, 8)) * 1.5, jnp.float32)
    config = SamplingConfig(temperature=0.8, top_k=5, top_p=0.9)
    expected = np.asarray(probabilities(logits, config))[0]
    draws = sample(jax.random.key(3), jnp.broadcast_to(logits, (20_000, 8)), config)
    freq = np.bincount(np.asarray(draws), minlength=8) / 20_000
    assert np.all(freq[expected == 0] == 0)
    np.testing.assert_allclose(freq, expected, atol=0.015)
    from_probs = sample_from_probs(jax.random.key(4), jnp.broadcast_to(jnp.asarray(expected),
                                                                       (20_000, 8)))
    np.testing.assert_allclose(np.bincount(np.asarray(from_probs), minlength=8) / 20_000,
                               expected, atol=0.015)


def test_seeded_sampling_is_reproducible():
    logits = jnp.asarray(np.random.default_rng(5).normal(size=(4, 30)), jnp.float32)
    config = SamplingConfig(temperature=1.0)
    a = sample(jax.random.key(7), logits, config)
    b = sample(jax.random.key(7), logits, config)
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("kwargs", [dict(temperature=-1.0), dict(top_k=-2), dict(top_p=0.0),
                                    dict(top_p=1.5)])
def test_bad_sampling_config_names_the_value(kwargs):
    name, value = next(iter(kwargs.items()))
    with pytest.raises(ValueError, match=f"{name}={value!r}"):
        SamplingConfig(**kwargs)
