"""The SFT objective against a plain numpy version on packed rows with response masks."""

import types

import numpy as np

from mimo_jax.train import losses, sft_loss


def numpy_masked_cross_entropy(logits, tokens, segment_ids, loss_mask, shift):
    """Sum and count of -log softmax(logits[b, t])[tokens[b, t + shift]] over marked targets of
    the same example."""
    total, count = 0.0, 0
    b, t, _ = logits.shape
    for i in range(b):
        for j in range(t - shift):
            same = segment_ids[i, j] > 0 and segment_ids[i, j + shift] == segment_ids[i, j]
            if same and loss_mask[i, j + shift]:
                row = logits[i, j].astype(np.float64)
                log_z = np.log(np.sum(np.exp(row - row.max()))) + row.max()
                total += log_z - row[tokens[i, j + shift]]
                count += 1
    return total, count


def packed_rows():
    """Row 0: three examples (prompt then response each); row 1: one example then padding."""
    rng = np.random.default_rng(0)
    b, t, v, m = 2, 12, 13, 2
    segment_ids = np.array([[1] * 5 + [2] * 3 + [3] * 4, [1] * 8 + [0] * 4], np.int32)
    loss_mask = np.array([[0, 0, 1, 1, 1, 0, 1, 1, 0, 0, 0, 1],
                          [0, 0, 0, 1, 1, 1, 1, 1, 0, 0, 0, 0]], np.int32)
    tokens = rng.integers(0, v, size=(b, t)).astype(np.int32)
    output = types.SimpleNamespace(
        logits=rng.normal(size=(b, t, v)).astype(np.float32) * 3,
        mtp_logits=rng.normal(size=(m, b, t, v)).astype(np.float32) * 3)
    return output, tokens, segment_ids, loss_mask


def test_sums_and_counts_match_numpy_on_response_targets():
    output, tokens, segment_ids, loss_mask = packed_rows()
    sums = np.asarray(sft_loss.sft_loss_sums(output, tokens, segment_ids, loss_mask))
    counts = np.asarray(sft_loss.sft_target_counts(segment_ids, loss_mask, 2))
    want = [numpy_masked_cross_entropy(output.logits, tokens, segment_ids, loss_mask, 1),
            numpy_masked_cross_entropy(output.mtp_logits[0], tokens, segment_ids, loss_mask, 2),
            numpy_masked_cross_entropy(output.mtp_logits[1], tokens, segment_ids, loss_mask, 3)]
    np.testing.assert_allclose(sums, [w[0] for w in want], rtol=1e-5)
    np.testing.assert_array_equal(counts, [w[1] for w in want])
    # Main head: targets are the marked tokens that do not open their example.
    assert counts[0] == 3 + 2 + 1 + 5


def test_full_mask_is_the_pretraining_objective():
    output, tokens, segment_ids, _ = packed_rows()
    everything = (segment_ids > 0).astype(np.int32)
    np.testing.assert_allclose(sft_loss.sft_loss_sums(output, tokens, segment_ids, everything),
                               losses.loss_sums(output, tokens, segment_ids), rtol=1e-6)
    np.testing.assert_array_equal(sft_loss.sft_target_counts(segment_ids, everything, 2),
                                  losses.target_counts(segment_ids, 2))
