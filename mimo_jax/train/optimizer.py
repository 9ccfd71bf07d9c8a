"""AdamW with global-norm clipping and SPEC.md's warm-up / constant / cosine schedule.

The router's `e_score_correction_bias` is state, not a trained weight: the optimizer gives it a zero
update (so it takes no Adam moments, no weight decay and no part in the clipping norm) and the
trainer moves it with the model's bias-update rule after each step.

The optimizer returns unit-rate updates `-(adam + weight_decay * w)` (decoupled decay, as
`optax.adamw`); the train step multiplies them by the learning rate, which it receives as an
argument. The schedule is plain host arithmetic, so a new schedule or peak rate (an ablation, a
resumed run with a longer horizon) reuses the compiled step.
"""

from __future__ import annotations

import math
from typing import Any, Callable

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


def learning_rate_schedule(config: TrainConfig) -> Callable[[int], float]:
    """step (0-based) -> learning rate: linear warm-up to the peak, constant, cosine to the end.

    Warm-up covers steps [0, W) and reaches the peak at step W - 1; the cosine runs from the peak
    at step D to `end_learning_rate` at step `steps`.
    """
    steps = config.steps
    warmup = int(round(config.warmup_fraction * steps))
    decay_start = max(int(round(config.decay_start_fraction * steps)), warmup)
    peak, end = config.learning_rate, config.end_learning_rate

    def schedule(step: int) -> float:
        if step < warmup:
            return peak * (step + 1) / warmup
        if step < decay_start:
            return peak
        progress = min((step - decay_start) / max(steps - decay_start, 1), 1.0)
        return end + (peak - end) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return schedule


def make_optimizer(config: TrainConfig, params: Any) -> optax.GradientTransformation:
    """The run's optimizer (unit learning rate) for a parameter tree shaped like `params`."""
    adamw = optax.chain(
        optax.clip_by_global_norm(config.clip_norm),
        optax.scale_by_adam(b1=config.adam_b1, b2=config.adam_b2, eps=config.adam_eps),
        optax.add_decayed_weights(config.weight_decay, mask=decay_mask),
        optax.scale(-1.0),
    )
    return optax.multi_transform({TRAINED: adamw, FROZEN: optax.set_to_zero()},
                                 param_labels(params))


def scale_updates(updates: Any, learning_rate: jax.Array) -> Any:
    """Unit-rate updates times the step's learning rate."""
    return jax.tree.map(lambda u: (u * learning_rate).astype(u.dtype), updates)
