"""The pre-training objective: next-token cross-entropy + MTP cross-entropy + sequence balance loss.

  loss = CE(main) + mtp_loss_weight * mean_k CE(MTP head k) + balance_loss_weight * balance

Targets come from the model's segment-aware shift (`mimo_jax.model.mtp.shift_left`): the main
head at position t predicts token t+1 of the same document, MTP head k (0-based) token t+k+2;
positions whose target falls past the document, the row, or on padding carry no loss.

Each cross-entropy is a mean over the target tokens of the whole (global) batch. So that gradient
accumulation gives the same result as one large batch, the per-micro-batch functions return sums
and the caller divides by token counts of the full batch (`target_counts`).
Legend: B batch, T length, V vocab, M MTP heads.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from mimo_jax.model.mtp import shift_left


def target_mask(segment_ids: jax.Array, shift: int) -> jax.Array:
    """[B, T] bool: positions whose token `shift` ahead is in the same document."""
    return shift_left(segment_ids, segment_ids, shift)[1]


def target_counts(segment_ids: jax.Array, num_mtp_heads: int) -> jax.Array:
    """[1 + M] float32: target tokens of the main head and of each MTP head."""
    return jnp.stack([jnp.sum(target_mask(segment_ids, s), dtype=jnp.float32)
                      for s in range(1, num_mtp_heads + 2)])


def cross_entropy_sum(logits: jax.Array, tokens: jax.Array, segment_ids: jax.Array,
                      shift: int) -> jax.Array:
    """Sum over valid positions of -log p(token[t + shift] | ...). logits: [B, T, V] -> []."""
    targets, valid = shift_left(tokens, segment_ids, shift)
    per_token = optax.losses.softmax_cross_entropy_with_integer_labels(
        logits.astype(jnp.float32), targets)
    return jnp.sum(jnp.where(valid, per_token, 0.0))


def stacked_cross_entropy_sums(mtp_logits: jax.Array, tokens: jax.Array,
                               segment_ids: jax.Array, counted: jax.Array | None = None
                               ) -> jax.Array:
    """[M] sums of the MTP heads' cross-entropies, head k (0-based) on token t+k+2.

    mtp_logits: [M, B, T, V]; counted: optional [M, B, T] bool, the positions that count besides
    the in-document rule (e.g. response targets). One cross-entropy over the stacked logits, not
    one per head slice: the gradient then comes back as one [M, B, T, V] array, where per-head
    slices make XLA:CPU add them into the stack through a transposing copy of every head's
    logits gradient (about a tenth of the tiny train step).
    """
    shifted = [shift_left(tokens, segment_ids, k + 2) for k in range(mtp_logits.shape[0])]
    targets = jnp.stack([target for target, _ in shifted])  # [M, B, T]
    valid = jnp.stack([valid for _, valid in shifted])
    if counted is not None:
        valid = valid & counted
    per_token = optax.losses.softmax_cross_entropy_with_integer_labels(
        mtp_logits.astype(jnp.float32), targets)
    return jnp.sum(jnp.where(valid, per_token, 0.0), axis=(1, 2))


def loss_sums(output: Any, tokens: jax.Array, segment_ids: jax.Array) -> jax.Array:
    """[1 + M] summed cross-entropies: main head, then each MTP head, for one (micro-)batch."""
    main = cross_entropy_sum(output.logits, tokens, segment_ids, 1)[None]
    if output.mtp_logits is None:
        return main
    return jnp.concatenate([main, stacked_cross_entropy_sums(output.mtp_logits, tokens,
                                                             segment_ids)])


def total_loss(ce_sums: jax.Array, counts: jax.Array, balance_loss: jax.Array,
               mtp_loss_weight: float, balance_loss_weight: float) -> tuple[jax.Array, dict]:
    """Combines summed cross-entropies ([1 + M]) and counts ([1 + M]) into the scalar objective.

    Returns (loss, parts) where parts has `ce`, `mtp` (mean over heads; 0 without heads) and
    `balance`.
    """
    means = ce_sums / jnp.maximum(counts, 1.0)
    ce = means[0]
    mtp = jnp.mean(means[1:]) if means.shape[0] > 1 else jnp.zeros((), jnp.float32)
    loss = ce + mtp_loss_weight * mtp + balance_loss_weight * balance_loss
    return loss, {"ce": ce, "mtp": mtp, "balance": balance_loss}
