"""The SFT objective: the pretraining cross-entropies counted on response targets only.

`loss_mask` ([B, T], aligned with `tokens`, from `mimo_jax.data.sft`) marks the tokens that are
targets: the main head at position t is scored on token t+1, MTP head k (0-based) on token
t+k+2, each only where that target is marked and in the same packed example. The functions
mirror `losses.loss_sums` / `losses.target_counts`, so `losses.total_loss` combines them as in
pretraining (sums per micro-batch, counts of the whole batch).
Legend: B batch, T length, V vocab, M MTP heads.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from mimo_jax.model.mtp import shift_left
from mimo_jax.train.losses import stacked_cross_entropy_sums


def response_targets(segment_ids: jax.Array, loss_mask: jax.Array, shift: int) -> jax.Array:
    """[B, T] bool: positions whose token `shift` ahead is a marked target of the same example."""
    marked, valid = shift_left(loss_mask.astype(bool), segment_ids, shift, fill=False)
    return marked & valid


def masked_cross_entropy_sum(logits: jax.Array, tokens: jax.Array, segment_ids: jax.Array,
                             loss_mask: jax.Array, shift: int) -> jax.Array:
    """Sum over response targets of -log p(token[t + shift] | ...). logits: [B, T, V] -> []."""
    targets, _ = shift_left(tokens, segment_ids, shift)
    per_token = optax.losses.softmax_cross_entropy_with_integer_labels(
        logits.astype(jnp.float32), targets)
    return jnp.sum(jnp.where(response_targets(segment_ids, loss_mask, shift), per_token, 0.0))


def sft_loss_sums(output: Any, tokens: jax.Array, segment_ids: jax.Array,
                  loss_mask: jax.Array) -> jax.Array:
    """[1 + M] summed response cross-entropies: main head, then each MTP head."""
    main = masked_cross_entropy_sum(output.logits, tokens, segment_ids, loss_mask, 1)[None]
    if output.mtp_logits is None:
        return main
    counted = jnp.stack([response_targets(segment_ids, loss_mask, k + 2)
                         for k in range(output.mtp_logits.shape[0])])
    return jnp.concatenate([main, stacked_cross_entropy_sums(output.mtp_logits, tokens,
                                                             segment_ids, counted)])


def sft_target_counts(segment_ids: jax.Array, loss_mask: jax.Array,
                      num_mtp_heads: int) -> jax.Array:
    """[1 + M] float32: response targets of the main head and of each MTP head."""
    return jnp.stack([jnp.sum(response_targets(segment_ids, loss_mask, s), dtype=jnp.float32)
                      for s in range(1, num_mtp_heads + 2)])
