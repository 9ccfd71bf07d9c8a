"""The MOPD objective against a plain numpy version on random log-probs with random masks."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mimo_jax.train import mopd_objective as mo

B, T = 6, 9


def numpy_group_advantages(rewards, eps=1e-6):
    out = np.zeros_like(rewards, dtype=np.float64)
    for p, group in enumerate(rewards.astype(np.float64)):
        out[p] = (group - group.mean()) / (group.std() + eps)
    return out


def numpy_loss(student, sampling, teacher, outcome, mask, alpha, eps_low, eps_high, use_teacher):
    """Token by token: loss, d loss / d student, and the metrics."""
    loss, grad = 0.0, np.zeros_like(student, dtype=np.float64)
    kl_sum, masked, tokens, lengths = 0.0, 0, 0, []
    for b in range(student.shape[0]):
        length = int(mask[b].sum())
        if length:
            lengths.append(length)
        for t in range(student.shape[1]):
            if not mask[b, t]:
                continue
            advantage = alpha * outcome[b]
            if use_teacher:
                advantage += float(teacher[b, t]) - float(student[b, t])
            ratio = float(np.exp(np.float32(student[b, t]) - np.float32(sampling[b, t])))
            weight = ratio if eps_low <= ratio <= eps_high else 0.0
            masked += weight == 0.0
            loss -= weight * advantage * float(student[b, t]) / length
            grad[b, t] = -weight * advantage / length
            kl_sum += float(student[b, t]) - float(teacher[b, t])
            tokens += 1
    metrics = {"reverse_kl": kl_sum / tokens, "masked_share": masked / tokens,
               "response_length": float(np.mean(lengths)), "tokens": tokens}
    return loss, grad, metrics


@pytest.fixture(name="batch")
def fixture_batch():
    """Log-probs in (-4, -0.01); sampling log-probs near the student's so that most ratios fall
    inside [0.5, 2] and some outside; masks of random lengths at random offsets, one empty row."""
    rng = np.random.default_rng(0)
    student = np.log(rng.uniform(0.02, 0.99, size=(B, T))).astype(np.float32)
    sampling = (student + rng.normal(scale=0.6, size=(B, T))).astype(np.float32)
    sampling = np.minimum(sampling, -1e-3).astype(np.float32)
    teacher = np.log(rng.uniform(0.02, 0.99, size=(B, T))).astype(np.float32)
    mask = np.zeros((B, T), bool)
    for b in range(B - 1):
        start = int(rng.integers(0, 3))
        mask[b, start:start + int(rng.integers(1, T - start + 1))] = True
    # Padding holds garbage, -inf included: it must not leak into values or gradients.
    student[~mask] = -np.inf
    teacher[~mask] = 7.0
    outcome = rng.normal(size=B).astype(np.float32)
    return student, sampling, teacher, outcome, mask


@pytest.mark.parametrize("alpha,use_teacher", [(0.7, True), (0.0, True), (1.3, False)])
def test_loss_gradient_and_metrics_match_numpy(batch, alpha, use_teacher):
    student, sampling, teacher, outcome, mask = batch
    objective = mo.MopdObjective(alpha=alpha, eps_low=0.5, eps_high=2.0, use_teacher=use_teacher)
    want_loss, want_grad, want_metrics = numpy_loss(student, sampling, teacher, outcome, mask,
                                                    alpha, 0.5, 2.0, use_teacher)
    assert 0.0 < want_metrics["masked_share"] < 0.5  # both branches of the range are exercised

    def loss_fn(student_lp, sampling_lp, teacher_lp, outcome_adv):
        return mo.mopd_loss(student_lp, sampling_lp, teacher_lp, outcome_adv, mask, objective)

    (loss, metrics), grads = jax.value_and_grad(loss_fn, argnums=(0, 1, 2, 3), has_aux=True)(
        student, sampling, teacher, outcome)
    np.testing.assert_allclose(loss, want_loss, rtol=1e-5)
    np.testing.assert_allclose(grads[0], want_grad, rtol=1e-5, atol=1e-7)
    # Teacher and sampling log-probs and the outcome advantage are data: no gradient reaches them.
    for other in grads[1:]:
        np.testing.assert_array_equal(other, np.zeros_like(other))
    for key, value in want_metrics.items():
        np.testing.assert_allclose(metrics[key], value, rtol=1e-5, err_msg=key)


def test_gradient_is_minus_weight_times_advantage_over_length(batch):
    student, sampling, teacher, outcome, mask = batch
    objective = mo.MopdObjective(alpha=0.4)
    grad = jax.grad(lambda s: mo.mopd_loss(s, sampling, teacher, outcome, mask, objective)[0])(
        student)
    weights, _ = mo.importance_weights(student, sampling, mask, objective)
    advantage = mo.token_advantages(student, teacher, outcome, mask, objective)
    lengths = np.maximum(mask.sum(-1, keepdims=True), 1)
    np.testing.assert_allclose(grad, -np.asarray(weights * advantage) / lengths, rtol=1e-6,
                               atol=1e-8)
    assert np.count_nonzero(np.asarray(grad)) > B  # the comparison is not between zeros


def test_group_advantages_match_numpy_and_equal_groups_give_zero():
    rng = np.random.default_rng(1)
    rewards = rng.uniform(size=(4, 8)).astype(np.float32)
    rewards[2] = 0.25  # a group with equal rewards
    rewards[3] = (rng.uniform(size=8) > 0.5).astype(np.float32)  # a 0/1 reward
    got = mo.group_advantages(jnp.asarray(rewards))
    chex.assert_shape(got, (4, 8))
    np.testing.assert_allclose(got, numpy_group_advantages(rewards), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(got[2], np.zeros(8))
    np.testing.assert_allclose(np.asarray(got[:2]).mean(-1), 0.0, atol=1e-6)


def test_clip_mask_matches_numpy_at_the_boundaries():
    # Ratios exactly 1 (log-probs equal) sit on both bounds when eps_low = eps_high = 1; the
    # others lie a hair inside or outside [0.5, 2].
    student = np.log(np.array([[0.5, 0.5, 0.5, 0.2, 0.2, 0.2, 0.3, 0.3]], np.float32))
    ratios = np.array([[1.0, 0.5 * 1.001, 0.5 * 0.999, 2.0 * 0.999, 2.0 * 1.001, 1.0, 40.0, 1e-3]])
    sampling = (student - np.log(ratios)).astype(np.float32)
    mask = np.ones_like(student, bool)
    mask[0, 5] = False
    for eps_low, eps_high in ((0.5, 2.0), (1.0, 1.0)):
        objective = mo.MopdObjective(eps_low=eps_low, eps_high=eps_high)
        weights, kept = mo.importance_weights(student, sampling, mask, objective)
        ratio = np.exp(student.astype(np.float32) - sampling)
        want_kept = mask & (ratio >= eps_low) & (ratio <= eps_high)
        np.testing.assert_array_equal(kept, want_kept)
        np.testing.assert_allclose(weights, np.where(want_kept, ratio, 0.0), rtol=1e-6)
    np.testing.assert_array_equal(kept[0], [1, 0, 0, 0, 0, 0, 0, 0])  # only ratio 1 is on [1, 1]


def test_token_log_probs_match_numpy():
    rng = np.random.default_rng(2)
    logits = rng.normal(size=(2, 5, 11)).astype(np.float32) * 3
    tokens = rng.integers(0, 11, size=(2, 5))
    got = mo.token_log_probs(logits, tokens, temperature=0.7)
    scaled = logits.astype(np.float64) / 0.7
    log_z = np.log(np.exp(scaled).sum(-1))
    want = np.take_along_axis(scaled, tokens[..., None], -1)[..., 0] - log_z
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_bad_settings_and_missing_inputs_raise():
    with pytest.raises(ValueError, match="eps_low=1.5"):
        mo.MopdObjective(eps_low=1.5)
    with pytest.raises(ValueError, match="alpha=-1"):
        mo.MopdObjective(alpha=-1.0)
    with pytest.raises(ValueError, match="no advantage"):
        mo.MopdObjective(alpha=0.0, use_teacher=False)
    ones = np.full((1, 3), -1.0, np.float32)
    mask = np.ones((1, 3), bool)
    with pytest.raises(ValueError, match="no teacher log-probs"):
        mo.mopd_loss(ones, ones, None, np.ones(1), mask, mo.MopdObjective())
    with pytest.raises(ValueError, match="alpha=0.5 needs outcome advantages"):
        mo.mopd_loss(ones, ones, ones, None, mask, mo.MopdObjective(alpha=0.5))
