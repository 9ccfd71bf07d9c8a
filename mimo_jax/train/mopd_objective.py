"""The MOPD objective (report section 4.4, eqs. 7-9) as pure functions over padded responses.

For a response y sampled from mu (the rollout's sampling distribution, after temperature/top-p):
  A_t = sg[log pi_teacher(y_t) - log pi_theta(y_t)] + alpha * A_ORM          (eq. 9)
  w_t = sg[pi_theta(y_t) / mu(y_t)] if eps_low <= pi_theta / mu <= eps_high else 0  (eq. 7)
  loss = -sum_responses (1/|y|) sum_t w_t A_t log pi_theta(y_t)
The loss is a sum over the batch's responses, so gradient accumulation over micro-batches adds up
to the whole batch; the caller divides by the number of responses for eq. 7's expectation.
Gradients reach only log pi_theta: teacher and sampling log-probs are data, and both the
advantage and the weight stop their gradient. Out-of-range tokens are masked, not clipped (IcePop).

ORM-only RL (GRPO-style) is the same loss with the teacher term off; MOPD without ORM is alpha = 0.
Inputs are [B, T] arrays of log-probabilities of the sampled tokens, aligned with a [B, T]
response mask (1 on the response's tokens, 0 on prompt and padding). Values off the mask are
never read, so padding may hold anything, -inf included.
Legend: B responses, T response length, P prompts, G samples per prompt, V vocabulary.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class MopdObjective:
    """Settings of the loss.

    alpha: weight of the outcome-reward advantage (0 = MOPD without ORM).
    eps_low, eps_high: the range of pi_theta / mu whose tokens keep their weight.
    use_teacher: False drops the teacher term from the advantage (ORM-only RL).
    """

    alpha: float = 1.0
    eps_low: float = 0.5
    eps_high: float = 2.0
    use_teacher: bool = True

    def __post_init__(self):
        if not 0.0 <= self.eps_low <= 1.0 <= self.eps_high:
            raise ValueError(f"need 0 <= eps_low <= 1 <= eps_high, got eps_low={self.eps_low}, "
                             f"eps_high={self.eps_high}")
        if self.alpha < 0:
            raise ValueError(f"alpha={self.alpha} must be >= 0")
        if not self.use_teacher and self.alpha == 0:
            raise ValueError("use_teacher=False with alpha=0 leaves no advantage to learn from")


def token_log_probs(logits: jax.Array, tokens: jax.Array, temperature: float = 1.0) -> jax.Array:
    """log softmax(logits / temperature)[token]: logits [B, T, V], tokens [B, T] -> [B, T] float32.

    logits[b, t] is the distribution that produced tokens[b, t] (already shifted by the caller).
    """
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32) / temperature, axis=-1)
    return jnp.take_along_axis(log_probs, tokens[..., None].astype(jnp.int32), axis=-1)[..., 0]


def group_advantages(rewards: jax.Array, eps: float = 1e-6) -> jax.Array:
    """GRPO outcome advantages: (r - mean over the group) / (std over the group + eps).

    rewards: [P, G] (G samples of each prompt) -> [P, G] float32. The std is the population one
    (divides by G); a group whose rewards are all equal gets 0 everywhere.
    """
    rewards = rewards.astype(jnp.float32)
    centred = rewards - jnp.mean(rewards, axis=-1, keepdims=True)
    std = jnp.sqrt(jnp.mean(jnp.square(centred), axis=-1, keepdims=True))
    return centred / (std + eps)


def _masked(values: jax.Array, mask: jax.Array) -> jax.Array:
    return jnp.where(mask, values.astype(jnp.float32), 0.0)


def token_advantages(student_log_probs: jax.Array, teacher_log_probs: jax.Array | None,
                     outcome_advantages: jax.Array | None, response_mask: jax.Array,
                     objective: MopdObjective) -> jax.Array:
    """A_t (eq. 9), without gradient: [B, T] log-probs, outcome advantages [B] -> [B, T].

    0 off the response mask. outcome_advantages may be None only when alpha is 0.
    """
    mask = response_mask.astype(bool)
    advantage = jnp.zeros(mask.shape, jnp.float32)
    if objective.use_teacher:
        if teacher_log_probs is None:
            raise ValueError("the teacher term is on (use_teacher=True) but no teacher log-probs "
                             "were given")
        gap = _masked(teacher_log_probs, mask) - _masked(student_log_probs, mask)
        advantage = advantage + gap
    if objective.alpha:
        if outcome_advantages is None:
            raise ValueError(f"alpha={objective.alpha} needs outcome advantages, got None")
        advantage = advantage + objective.alpha * outcome_advantages.astype(jnp.float32)[:, None]
    # The advantage is data to the update (eq. 9's sg, which A_ORM's rewards need as well).
    return jax.lax.stop_gradient(jnp.where(mask, advantage, 0.0))


def importance_weights(student_log_probs: jax.Array, sampling_log_probs: jax.Array,
                       response_mask: jax.Array, objective: MopdObjective
                       ) -> tuple[jax.Array, jax.Array]:
    """(w_t, kept): w_t = sg[pi_theta / mu] inside [eps_low, eps_high] (bounds included), else 0.

    [B, T] log-probs -> ([B, T] float32 weights, [B, T] bool: response tokens inside the range).
    """
    mask = response_mask.astype(bool)
    log_ratio = _masked(student_log_probs, mask) - _masked(sampling_log_probs, mask)
    ratio = jnp.exp(jax.lax.stop_gradient(log_ratio))
    kept = mask & (ratio >= objective.eps_low) & (ratio <= objective.eps_high)
    return jnp.where(kept, ratio, 0.0), kept


def response_lengths(response_mask: jax.Array) -> jax.Array:
    """|y| per response: [B, T] -> [B] float32."""
    return jnp.sum(response_mask.astype(jnp.float32), axis=-1)


def mopd_loss(student_log_probs: jax.Array, sampling_log_probs: jax.Array,
              teacher_log_probs: jax.Array | None, outcome_advantages: jax.Array | None,
              response_mask: jax.Array, objective: MopdObjective) -> tuple[jax.Array, dict]:
    """The surrogate loss (eq. 7) summed over responses, and per-token metrics of the batch.

    student_log_probs (log pi_theta), sampling_log_probs (log mu), teacher_log_probs
    (log pi_teacher, or None when the teacher term is off): [B, T]; outcome_advantages: [B]
    (or None when alpha = 0); response_mask: [B, T]. A response of length 0 (a padding row)
    adds nothing. Returns (loss [], metrics) with metrics from `token_metrics`.
    """
    mask = response_mask.astype(bool)
    advantage = token_advantages(student_log_probs, teacher_log_probs, outcome_advantages,
                                 mask, objective)
    weights, kept = importance_weights(student_log_probs, sampling_log_probs, mask, objective)
    per_token = weights * advantage * _masked(student_log_probs, mask)
    per_response = jnp.sum(per_token, axis=-1) / jnp.maximum(response_lengths(mask), 1.0)
    loss = -jnp.sum(per_response)
    metrics = token_metrics(student_log_probs, teacher_log_probs, kept, mask)
    return loss, metrics


def token_metrics(student_log_probs: jax.Array, teacher_log_probs: jax.Array | None,
                  kept: jax.Array, response_mask: jax.Array) -> dict[str, jax.Array]:
    """Means over the response tokens under `response_mask` ([B, T]; narrow it for one domain).

    reverse_kl: mean of log pi_theta - log pi_teacher (omitted without teacher log-probs);
    masked_share: share of tokens whose weight was zeroed by the ratio range (`kept` [B, T]);
    response_length: mean |y| over responses with at least one token; tokens: their count.
    """
    mask = response_mask.astype(bool)
    tokens = jnp.sum(mask, dtype=jnp.float32)
    denominator = jnp.maximum(tokens, 1.0)
    lengths = response_lengths(mask)
    responses = jnp.sum(lengths > 0, dtype=jnp.float32)
    metrics = {
        "masked_share": jnp.sum(mask & ~kept.astype(bool), dtype=jnp.float32) / denominator,
        "response_length": jnp.sum(lengths) / jnp.maximum(responses, 1.0),
        "tokens": tokens,
    }
    if teacher_log_probs is not None:
        gap = _masked(student_log_probs, mask) - _masked(teacher_log_probs, mask)
        metrics["reverse_kl"] = jax.lax.stop_gradient(jnp.sum(gap) / denominator)
    return metrics
