"""The objective against a plain numpy version on random logits with packing and padding."""

import types

import numpy as np
import pytest

from mimo_jax.train import losses


def numpy_cross_entropy(logits, tokens, segment_ids, shift):
    """Sum and count of -log softmax(logits[b, t])[tokens[b, t + shift]] over same-document pairs."""
    total, count = 0.0, 0
    b, t, _ = logits.shape
    for i in range(b):
        for j in range(t - shift):
            if segment_ids[i, j] > 0 and segment_ids[i, j + shift] == segment_ids[i, j]:
                row = logits[i, j].astype(np.float64)
                log_z = np.log(np.sum(np.exp(row - row.max()))) + row.max()
                total += log_z - row[tokens[i, j + shift]]
                count += 1
    return total, count


@pytest.fixture(name="packed")
def fixture_packed():
    rng = np.random.default_rng(0)
    b, t, v, m = 3, 12, 17, 2
    # Row 0: three documents; row 1: one document then padding; row 2: a single full document.
    segment_ids = np.array([[1] * 5 + [2] * 2 + [3] * 5, [1] * 7 + [0] * 5, [1] * 12], np.int32)
    tokens = rng.integers(0, v, size=(b, t)).astype(np.int32)
    output = types.SimpleNamespace(
        logits=rng.normal(size=(b, t, v)).astype(np.float32) * 3,
        mtp_logits=rng.normal(size=(m, b, t, v)).astype(np.float32) * 3)
    return output, tokens, segment_ids


def test_sums_counts_and_total_match_numpy(packed):
    output, tokens, segment_ids = packed
    sums = np.asarray(losses.loss_sums(output, tokens, segment_ids))
    counts = np.asarray(losses.target_counts(segment_ids, 2))
    want = [numpy_cross_entropy(output.logits, tokens, segment_ids, 1),
            numpy_cross_entropy(output.mtp_logits[0], tokens, segment_ids, 2),
            numpy_cross_entropy(output.mtp_logits[1], tokens, segment_ids, 3)]
    np.testing.assert_allclose(sums, [w[0] for w in want], rtol=1e-5)
    np.testing.assert_array_equal(counts, [w[1] for w in want])
    # Row 0 loses one target per document boundary per shift; padding carries none.
    assert list(counts) == [4 + 1 + 4 + 6 + 11, 3 + 0 + 3 + 5 + 10, 2 + 0 + 2 + 4 + 9]
    loss, parts = losses.total_loss(sums, counts, np.float32(1.25), 0.3, 1e-2)
    ce = want[0][0] / want[0][1]
    mtp = (want[1][0] / want[1][1] + want[2][0] / want[2][1]) / 2
    assert float(parts["ce"]) == pytest.approx(ce, rel=1e-5)
    assert float(parts["mtp"]) == pytest.approx(mtp, rel=1e-5)
    assert float(loss) == pytest.approx(ce + 0.3 * mtp + 1e-2 * 1.25, rel=1e-5)


def test_without_mtp_heads(packed):
    output, tokens, segment_ids = packed
    output = types.SimpleNamespace(logits=output.logits, mtp_logits=None)
    sums = losses.loss_sums(output, tokens, segment_ids)
    loss, parts = losses.total_loss(sums, losses.target_counts(segment_ids, 0), 0.0, 0.3, 0.0)
    assert sums.shape == (1,) and float(parts["mtp"]) == 0.0
    assert float(loss) == pytest.approx(float(parts["ce"]))
