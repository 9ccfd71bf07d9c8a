"""The optimizer: frozen router bias, weight-decay mask, clipping, and the learning-rate schedule."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mimo_jax.config import ConfigError
from mimo_jax.train.config import END_LR_RATIO, train_config_from_dict
from mimo_jax.train.optimizer import (decay_mask, learning_rate_schedule, make_optimizer,
                                      scale_updates)


def params_like_the_model(seed=0):
    """The leaf names and nesting of the real tree (scanned runs carry a leading layer axis)."""
    keys = iter(jax.random.split(jax.random.PRNGKey(seed), 8))
    normal = lambda shape: jax.random.normal(next(keys), shape)  # noqa: E731
    return {
        "embed": {"embedding": normal((50, 8))},
        "decoder": {"run_1": {
            "attention": {"q_proj": normal((2, 8, 2, 4)), "sinks": normal((2, 2))},
            "input_norm": {"scale": jnp.ones((2, 8))},
            "moe": {"router": normal((2, 8, 4)), "e_score_correction_bias": normal((2, 4))},
        }},
        "lm_head": {"kernel": normal((8, 50))},
    }


def config(**overrides):
    values = dict(steps=100, learning_rate=1e-2, weight_decay=0.1, clip_norm=1.0)
    values.update(overrides)
    return train_config_from_dict(values)


def test_correction_bias_gets_no_update_and_no_state():
    params = params_like_the_model()
    optimizer = make_optimizer(config(), params)
    state = optimizer.init(params)
    # Adam moments exist for trained weights only.
    moments = [x for x in jax.tree.leaves(state) if getattr(x, "ndim", 0) > 0]
    bias_shape = params["decoder"]["run_1"]["moe"]["e_score_correction_bias"].shape
    assert sum(x.size for x in moments) == 2 * (
        sum(x.size for x in jax.tree.leaves(params)) - np.prod(bias_shape))
    grads = jax.tree.map(jnp.ones_like, params)  # even a (wrong) gradient on the bias
    updates, _ = optimizer.update(grads, state, params)
    np.testing.assert_array_equal(updates["decoder"]["run_1"]["moe"]["e_score_correction_bias"], 0)
    assert float(jnp.abs(updates["decoder"]["run_1"]["moe"]["router"]).min()) > 0


def test_decay_mask_and_decoupled_decay():
    params = params_like_the_model()
    mask = decay_mask(params)
    assert mask["embed"]["embedding"] and mask["decoder"]["run_1"]["attention"]["q_proj"]
    assert not mask["decoder"]["run_1"]["attention"]["sinks"]
    assert not mask["decoder"]["run_1"]["input_norm"]["scale"]
    # With a zero gradient, the (unit-rate) AdamW update is -wd * w on decayed leaves, 0 elsewhere;
    # the train step scales it by the learning rate.
    optimizer = make_optimizer(config(), params)
    updates, _ = optimizer.update(jax.tree.map(jnp.zeros_like, params), optimizer.init(params),
                                  params)
    updates = scale_updates(updates, 1e-2)
    np.testing.assert_allclose(updates["lm_head"]["kernel"],
                               -1e-2 * 0.1 * params["lm_head"]["kernel"], rtol=1e-6)
    np.testing.assert_array_equal(updates["decoder"]["run_1"]["input_norm"]["scale"], 0)


def test_clipping_uses_the_trained_gradients_only():
    params = params_like_the_model()
    # Adam's first (bias-corrected) update is -g / (|g| + eps) at unit rate: with a huge eps it is
    # linear in the gradient, so the clipping shows in the update.
    cfg = config(weight_decay=0.0, adam_eps=1e3, clip_norm=1.0)
    optimizer = make_optimizer(cfg, params)
    grads = jax.tree.map(lambda x: 3.0 * jnp.ones_like(x), params)
    trained = [x for path, x in jax.tree_util.tree_leaves_with_path(grads)
               if "e_score_correction_bias" not in jax.tree_util.keystr(path)]
    norm = float(jnp.sqrt(sum(jnp.sum(x ** 2) for x in trained)))
    for bias_grad in (0.0, 1e6):  # the bias gradient must not enter the clipping norm
        grads["decoder"]["run_1"]["moe"]["e_score_correction_bias"] = jnp.full((2, 4), bias_grad)
        updates, _ = optimizer.update(grads, optimizer.init(params), params)
        clipped = 3.0 / norm
        np.testing.assert_allclose(updates["lm_head"]["kernel"], -clipped / (clipped + 1e3),
                                   rtol=1e-4)


def test_schedule_warmup_constant_cosine():
    cfg = config(steps=1000, learning_rate=3.2e-4, warmup_fraction=0.1, decay_start_fraction=0.4)
    lr = learning_rate_schedule(cfg)
    close = lambda value: pytest.approx(value, rel=1e-5)  # noqa: E731
    assert lr(0) == close(3.2e-4 / 100)
    assert lr(49) == close(3.2e-4 / 2)
    assert lr(99) == close(3.2e-4)
    assert lr(100) == close(3.2e-4) and lr(399) == close(3.2e-4)
    assert lr(700) == close(1e-4 + (3.2e-4 - 1e-4) * 0.5)  # half way down the cosine
    assert lr(1000) == close(1e-4)  # SPEC.md: 3.2e-4 -> 1e-4
    assert cfg.end_learning_rate == pytest.approx(3.2e-4 * END_LR_RATIO)
    values = np.array([lr(s) for s in range(0, 1001, 10)])
    assert np.all(np.diff(values[:10]) > 0) and np.all(np.diff(values[40:]) <= 1e-12)


@pytest.mark.parametrize("key,value,message", [
    ("steps", 0, "'train.steps' = 0"),
    ("end_learning_rate", 1.0, "'train.end_learning_rate' = 1.0"),
    ("warmup_fraction", 0.9, "'train.warmup_fraction' = 0.9"),
    ("compute_dtype", "fp8", "'train.compute_dtype' = 'fp8'"),
    ("adam_b2", 1.0, "'train.adam_b2' = 1.0"),
])
def test_bad_values_name_the_key(key, value, message):
    with pytest.raises(ConfigError, match=message):
        config(**{key: value})
    with pytest.raises(ConfigError, match="'train.lr' is unknown"):
        config(lr=1.0)
