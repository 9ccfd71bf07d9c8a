"""Token sampling: greedy, temperature, top-k and top-p (nucleus), as pure functions.

The filters act in the order temperature -> top-k -> top-p. Top-k keeps every token whose logit is
at least the k-th largest (ties at the boundary are all kept); top-p keeps the smallest set of most
probable tokens whose probability reaches p (the most probable token always stays; a token tied
with the last kept one stays too). Speculative decoding needs the filtered distribution itself
(`probabilities`), not only a sample, so that its acceptance rule reproduces it exactly.
Legend: B batch, V vocab.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """temperature 0 means greedy (argmax); top_k 0 and top_p 1 switch those filters off."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self):
        if not self.temperature >= 0:
            raise ValueError(f"sampling temperature={self.temperature!r} must be >= 0")
        if self.top_k < 0:
            raise ValueError(f"sampling top_k={self.top_k!r} must be >= 0 (0 = off)")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"sampling top_p={self.top_p!r} must be in (0, 1]")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def filter_logits(logits: jax.Array, config: SamplingConfig) -> jax.Array:
    """Logits divided by the temperature, -inf outside the top-k / top-p set. [..., V] float32.

    Not for greedy configs (temperature 0).
    """
    logits = logits.astype(jnp.float32) / config.temperature
    vocab = logits.shape[-1]
    if 0 < config.top_k < vocab:
        kth = jax.lax.top_k(logits, config.top_k)[0][..., -1:]
        logits = jnp.where(logits >= kth, logits, -jnp.inf)
    if config.top_p < 1:
        probs = jax.nn.softmax(logits, axis=-1)
        sorted_probs = -jnp.sort(-probs, axis=-1)
        before = jnp.cumsum(sorted_probs, axis=-1) - sorted_probs  # mass of more probable tokens
        kept = before < config.top_p
        # The smallest kept probability; everything at least as probable is kept.
        threshold = jnp.min(jnp.where(kept, sorted_probs, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(probs >= threshold, logits, -jnp.inf)
    return logits


def probabilities(logits: jax.Array, config: SamplingConfig) -> jax.Array:
    """The distribution tokens are drawn from: one-hot argmax when greedy. [..., V] float32."""
    if config.greedy:
        return jax.nn.one_hot(jnp.argmax(logits, axis=-1), logits.shape[-1], dtype=jnp.float32)
    return jax.nn.softmax(filter_logits(logits, config), axis=-1)


def sample(rng: jax.Array, logits: jax.Array, config: SamplingConfig) -> jax.Array:
    """One token per row of logits [..., V]. Returns [...] int32."""
    return sample_with_log_prob(rng, logits, config)[0]  # the unused log-prob compiles away


def sample_with_log_prob(rng: jax.Array, logits: jax.Array,
                         config: SamplingConfig) -> tuple[jax.Array, jax.Array]:
    """One token per row of logits [..., V] and its log-probability under the distribution it was
    drawn from (after temperature, top-k and top-p; 0 = log 1 when greedy).

    Returns (tokens [...] int32, log_probs [...] float32). The tokens are those of `sample`.
    """
    if config.greedy:
        tokens = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        return tokens, jnp.zeros(tokens.shape, jnp.float32)
    filtered = filter_logits(logits, config)
    tokens = jax.random.categorical(rng, filtered, axis=-1).astype(jnp.int32)
    log_probs = jax.nn.log_softmax(filtered, axis=-1)
    return tokens, jnp.take_along_axis(log_probs, tokens[..., None], axis=-1)[..., 0]


def sample_from_probs(rng: jax.Array, probs: jax.Array) -> jax.Array:
    """One token per row of a (possibly unnormalised) distribution [..., V]. Returns int32."""
    return jax.random.categorical(rng, jnp.log(probs), axis=-1).astype(jnp.int32)
