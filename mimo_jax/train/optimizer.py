"""AdamW with global-norm clipping and SPEC.md's warm-up / constant / cosine schedule.

The router's `e_score_correction_bias` is state, not a trained weight: the optimizer gives it a zero
update (so it takes no Adam moments, no weight decay and no part in the clipping norm) and the
trainer moves it with the model's bias-update rule after each step.
"""

from __future__ import annotations

from typing import Any

import jax
import optax

from mimo_jax.model.moe import CORRECTION_BIAS
from mimo_jax.train.config import TrainConfig

TRAINED = "adamw"
FROZEN = "correction_bias"
# RMSNorm scales and attention-sink logits are not decayed: shrinking them toward zero changes
# what they mean (a norm gain of 0, a sink of logit 0) rather than regularising.
NO_DECAY_NAMES = frozenset({"scale", "sinks"})


def _leaf_name(path: tuple) -> str:
    last = path[-1]
    return str(getattr(last, "key", getattr(last, "name", last)))


def param_labels(params: Any) -> Any:
    """FROZEN for every `e_score_correction_bias` leaf, TRAINED for the rest."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: FROZEN if _leaf_name(path) == CORRECTION_BIAS else TRAINED, params)


def decay_mask(params: Any) -> Any:
    """True where weight decay applies: every trained weight except norm scales and sinks."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: _leaf_name(path) not in NO_DECAY_NAMES | {CORRECTION_BIAS}, params)


def learning_rate_schedule(config: TrainConfig) -> optax.Schedule:
    """Linear warm-up to the peak, constant, then cosine to `end_learning_rate` at `steps`."""
    steps = config.steps
    warmup = int(round(config.warmup_fraction * steps))
    decay_start = max(int(round(config.decay_start_fraction * steps)), warmup)
    peak, end = config.learning_rate, config.end_learning_rate
    # Start the warm-up one step in, so the first update is not a zero step.
    pieces = [optax.linear_schedule(peak / max(warmup, 1), peak, max(warmup - 1, 1)),
              optax.constant_schedule(peak),
              optax.cosine_decay_schedule(peak, max(steps - decay_start, 1), alpha=end / peak)]
    return optax.join_schedules(pieces, [warmup, decay_start])


def make_optimizer(config: TrainConfig, params: Any) -> optax.GradientTransformation:
    """The run's optimizer for a parameter tree shaped like `params`."""
    adamw = optax.chain(
        optax.clip_by_global_norm(config.clip_norm),
        optax.adamw(learning_rate_schedule(config), b1=config.adam_b1, b2=config.adam_b2,
                    eps=config.adam_eps, weight_decay=config.weight_decay,
                    mask=decay_mask),
    )
    return optax.multi_transform({TRAINED: adamw, FROZEN: optax.set_to_zero()},
                                 param_labels(params))
