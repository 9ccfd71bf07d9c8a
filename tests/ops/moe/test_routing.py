"""Routing, expert load, balance loss and bias update against plain numpy. (Dispatch: the shared
cases of test_dispatch.py.)"""

import jax.numpy as jnp
import numpy as np

from mimo_jax.ops import moe as moe_ops


def _numpy_route(logits, bias, top_k, scaling=1.0):
    scores = 1.0 / (1.0 + np.exp(-logits))
    choice = scores + bias
    indices = np.argsort(-choice, axis=-1, kind="stable")[:, :top_k]
    weights = np.take_along_axis(scores, indices, axis=-1)
    weights = weights / (weights.sum(-1, keepdims=True) + 1e-20) * scaling
    return weights, indices, scores


def test_route_matches_numpy_and_bias_only_selects():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(64, 16)).astype(np.float32)
    bias = rng.normal(scale=0.5, size=(16,)).astype(np.float32)  # large enough to change choices
    weights, indices, scores = moe_ops.route(jnp.asarray(logits), jnp.asarray(bias), 4,
                                             scaling=1.5)
    ref_w, ref_i, ref_s = _numpy_route(logits, bias, 4, scaling=1.5)
    np.testing.assert_array_equal(np.asarray(indices), ref_i)
    np.testing.assert_allclose(np.asarray(weights), ref_w, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(scores), ref_s, rtol=1e-6)
    # The bias changed the selection somewhere, yet the weights are the unbiased scores.
    unbiased_i = _numpy_route(logits, np.zeros_like(bias), 4)[1]
    assert (np.sort(unbiased_i, -1) != np.sort(ref_i, -1)).any()
    np.testing.assert_allclose(np.asarray(weights).sum(-1), 1.5, rtol=1e-6)


def test_expert_load_skips_padding():
    indices = jnp.array([[0, 1], [1, 2], [2, 3], [0, 3]])
    mask = jnp.array([True, True, False, True])
    load = moe_ops.expert_load(indices, mask, 4)
    np.testing.assert_array_equal(np.asarray(load), [2, 2, 1, 1])


def test_sequence_balance_loss_matches_numpy_per_document():
    rng = np.random.default_rng(3)
    b, t, e, k = 2, 10, 6, 2
    scores = 1 / (1 + np.exp(-rng.normal(size=(b, t, e)))).astype(np.float32)
    indices = np.argsort(-scores, axis=-1)[..., :k]
    segments = np.array([[1, 1, 1, 2, 2, 2, 2, 0, 0, 0], [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]])
    per_doc = []
    for row in range(b):
        for seg in set(segments[row]) - {0}:
            sel = segments[row] == seg
            n = sel.sum()
            hits = np.zeros(e)
            for idx in indices[row][sel]:
                hits[idx] += 1
            f = hits * e / (k * n)
            p = (scores[row][sel] / scores[row][sel].sum(-1, keepdims=True)).mean(0)
            per_doc.append((f * p).sum())
    got = moe_ops.sequence_balance_loss(jnp.asarray(scores), jnp.asarray(indices),
                                        jnp.asarray(segments), k)
    np.testing.assert_allclose(float(got), np.mean(per_doc), rtol=1e-5)


def test_balance_loss_is_one_when_perfectly_balanced():
    # Each token picks 2 of 4 experts in rotation with uniform scores: f_i = 1, P_i = 1/4.
    indices = jnp.array([[[0, 1], [2, 3], [0, 1], [2, 3]]])
    scores = jnp.full((1, 4, 4), 0.3)
    got = moe_ops.sequence_balance_loss(scores, indices, jnp.ones((1, 4), jnp.int32), 2)
    np.testing.assert_allclose(float(got), 1.0, rtol=1e-6)


def test_bias_update_moves_towards_balance():
    bias = jnp.array([[0.1, -0.2, 0.0, 0.3], [0.0, 0.0, 0.0, 0.0]])
    load = jnp.array([[10.0, 2.0, 4.0, 4.0], [5.0, 5.0, 5.0, 5.0]])
    new = moe_ops.update_correction_bias(bias, load, 1e-3)
    # Layer 0: mean 5 -> overloaded expert 0 goes down, the others up. Layer 1: balanced, unchanged.
    np.testing.assert_allclose(np.asarray(new),
                               [[0.099, -0.199, 0.001, 0.301], [0.0, 0.0, 0.0, 0.0]], atol=1e-7)


def test_replay_gates_the_replayed_experts_and_falls_back_on_unrecorded_tokens():
    rng = np.random.default_rng(4)
    logits = rng.normal(size=(6, 8)).astype(np.float32)
    bias = rng.normal(scale=0.3, size=(8,)).astype(np.float32)
    _, chosen, scores = moe_ops.route(jnp.asarray(logits), jnp.asarray(bias), 3, scaling=2.0)
    replayed = np.array([[0, 1, 2], [7, 6, 5], [-1, 3, 4], [4, 3, -1], [2, 5, 0], [1, 1, 2]])
    indices = np.asarray(moe_ops.replayed_indices(jnp.asarray(replayed), chosen))
    # Rows 2 and 3 recorded nothing complete: the router's own choice, whole.
    np.testing.assert_array_equal(indices[[0, 1, 4, 5]], replayed[[0, 1, 4, 5]])
    np.testing.assert_array_equal(indices[2:4], np.asarray(chosen)[2:4])
    weights = np.asarray(moe_ops.gate_weights(scores, jnp.asarray(indices), scaling=2.0))
    ref_scores = 1.0 / (1.0 + np.exp(-logits))
    picked = np.take_along_axis(ref_scores, indices, axis=-1)
    np.testing.assert_allclose(weights, 2.0 * picked / picked.sum(-1, keepdims=True), rtol=1e-6)


def test_replay_mismatch_counts_experts_outside_the_routers_set():
    chosen = jnp.array([[[0, 1], [2, 3]], [[4, 5], [6, 7]]])  # [B=2, L=2, k=2]
    replayed = jnp.array([[[1, 0], [2, 7]],  # same set in another order; one of two differs
                          [[-1, 4], [0, 1]]])  # unrecorded (not counted); both differ
    mismatched, counted = moe_ops.replay_mismatch(replayed, chosen)
    assert (float(mismatched), float(counted)) == (3.0, 6.0)
    # A [B] token mask broadcasts over the layer axis: only row 0 counts.
    mismatched, counted = moe_ops.replay_mismatch(replayed, chosen, jnp.array([True, False]))
    assert (float(mismatched), float(counted)) == (1.0, 4.0)
