"""Model FLOPs per token against a count written out by hand for the micro model."""

import pytest

from mimo_jax.config import model_config_from_dict
from mimo_jax.train.flops import flops_per_token, mean_keys


def test_mean_keys_counts_the_window():
    assert mean_keys(4, None) == pytest.approx((1 + 2 + 3 + 4) / 4)
    assert mean_keys(6, 3) == pytest.approx((1 + 2 + 3 + 3 + 3 + 3) / 6)
    assert mean_keys(2, 10) == pytest.approx(1.5)
    # The sliding window makes a long row cost O(W) per token, not O(T).
    assert mean_keys(32_768, 129) == pytest.approx(129 - 129 * 128 / 2 / 32_768)


def test_micro_model_by_hand(micro):
    config = model_config_from_dict(micro.build_config(
        {f"model.{k}": v for k, v in micro.MICRO_MODEL.items()}).model)
    t, d = 16, 32
    # Both layer types: 2 query heads, 1 KV head, q/k 16, v 8.
    projections = 2 * d * (2 * 16 + 16 + 8) + 2 * 2 * 8 * d
    core_global = 2 * 2 * (16 + 8) * (t + 1) / 2
    core_sliding = 2 * 2 * (16 + 8) * mean_keys(t, 9)
    dense = 3 * 2 * d * 64
    experts = 2 * 3 * 2 * d * 16  # top-2 of 4
    router = 2 * d * 4
    lm_head = 2 * d * 320
    mtp = projections + core_sliding + dense + 2 * 2 * d * d + lm_head  # one head
    want = (projections + core_global + dense) + (projections + core_sliding + router + experts) \
        + lm_head + mtp
    got = flops_per_token(config, t)
    assert got.forward == pytest.approx(want)
    assert got.train == pytest.approx(3 * want)
    assert flops_per_token(config, t, with_mtp=False).forward == pytest.approx(want - mtp)
