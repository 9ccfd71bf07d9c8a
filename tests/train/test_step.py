"""The train step on the micro model: gradient accumulation, skipped non-finite steps, bias rule."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mimo_jax.config import model_config_from_dict
from mimo_jax.data.packing import pack_documents
from mimo_jax.model.transformer import MiMoV2Flash
from mimo_jax.ops.moe import update_correction_bias
from mimo_jax.train import router_bias
from mimo_jax.train.config import train_config_from_dict
from mimo_jax.train.optimizer import make_optimizer
from mimo_jax.train.state import init_state
from mimo_jax.train.step import document_count, make_train_step


# The lowest backend optimisation level: these tiny programs compile about twice as fast.
QUICK = {"xla_backend_optimization_level": 0}


@pytest.fixture(scope="module", name="setup")
def fixture_setup(micro):
    config = micro.build_config({f"model.{k}": v for k, v in micro.MICRO_MODEL.items()})
    model_config = model_config_from_dict(config.model)
    model = MiMoV2Flash(model_config)
    # A huge Adam eps makes the update proportional to the gradient (no sign flips from
    # rounding), so parameters of two equivalent steps can be compared closely.
    # The balance loss weighs as much as the cross-entropy: accumulation must get it exact too.
    train_config = train_config_from_dict(dict(steps=10, learning_rate=1e-2, adam_eps=1.0,
                                               balance_loss_weight=1.0, bias_update_rate=0.01))
    params_shape = jax.eval_shape(lambda: init_state(model, optax.identity(), 0).params)
    optimizer = make_optimizer(train_config, params_shape)
    state = jax.jit(lambda: init_state(model, optimizer, 0), compiler_options=QUICK)()
    rng = np.random.default_rng(0)
    documents = [rng.integers(2, 320, size=n).astype(np.int32) for n in rng.integers(3, 40, 12)]
    rows = pack_documents(documents, 32)[:4]
    batch = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
    batch["segment_ids"][3, 20:] = 0  # padding at the end of the last row
    batch["positions"][3, 20:] = 0
    return model_config, model, train_config, optimizer, state, batch


_STEPS = {}


def step_fn(setup, accum):
    """The jitted step for `accum` micro-batches, compiled once per module."""
    if accum not in _STEPS:
        model_config, model, train_config, optimizer, _, _ = setup
        cfg = dataclasses.replace(train_config, grad_accum_steps=accum)
        step = jax.jit(make_train_step(model, model_config, cfg, optimizer),
                       compiler_options=QUICK)
        _STEPS[accum] = lambda state, batch: step(state, batch, np.float32(1e-2))
    return _STEPS[accum]


def check_grad_accumulation_equals_one_batch(setup):
    _, _, _, _, state, batch = setup
    one, metrics_one = step_fn(setup, 1)(state, batch)
    two, metrics_two = step_fn(setup, 2)(state, batch)
    # The two micro-batches (rows 0, 2 and 1, 3) hold different numbers of documents, so the
    # mean of their balance losses would not be the whole batch's.
    micro = [int(document_count(batch["segment_ids"][rows])) for rows in (slice(0, 4, 2),
                                                                          slice(1, 4, 2))]
    assert micro[0] != micro[1], micro
    for key in ("loss", "ce", "mtp", "balance", "grad_norm"):
        assert float(metrics_two[key]) == pytest.approx(float(metrics_one[key]), rel=1e-5), key
    assert int(metrics_one["tokens"]) == 4 * 32 - 12
    # One device: nothing is dropped, with or without micro-batches (summed over them).
    assert int(metrics_one["dropped_copies"]) == int(metrics_two["dropped_copies"]) == 0
    for a, b in zip(jax.tree.leaves(one.params), jax.tree.leaves(two.params)):
        np.testing.assert_allclose(a, b, atol=2e-7)
    moved = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), one.params, state.params)
    assert max(jax.tree.leaves(moved)) > 1e-4  # the step did something


def check_non_finite_step_is_skipped(setup):
    _, _, _, _, state, batch = setup
    poisoned = jax.tree.map(lambda x: x, state.params)
    token = int(batch["tokens"][0, 0])
    poisoned["embed"]["embedding"] = poisoned["embed"]["embedding"].at[token].set(jnp.nan)
    bad_state = state.replace(params=poisoned)
    new_state, metrics = step_fn(setup, 1)(bad_state, batch)
    assert not bool(metrics["finite"]) and not np.isfinite(float(metrics["loss"]))
    assert int(new_state.step) == int(state.step) + 1  # the batch was consumed
    for a, b in zip(jax.tree.leaves((new_state.params, new_state.opt_state)),
                    jax.tree.leaves((bad_state.params, bad_state.opt_state))):
        np.testing.assert_array_equal(a, b)


def check_router_bias_follows_the_rule_only(setup):
    model_config, _, train_config, _, state, batch = setup
    new_state, metrics = step_fn(setup, 1)(state, batch)
    load = metrics["expert_load"]  # [MoE layers, experts], real tokens only
    assert load.shape == (1, 4) and float(load.sum()) == (4 * 32 - 12) * 2  # top-2
    before = router_bias.get_biases(state.params, model_config)
    after = router_bias.get_biases(new_state.params, model_config)
    want = update_correction_bias(before, load, train_config.bias_update_rate)
    np.testing.assert_allclose(after, want, atol=1e-7)  # no Adam, no weight decay on it
    assert float(jnp.abs(after - before).max()) == pytest.approx(0.01)


def test_train_step(setup):
    """One test function, so that the step variants compile once even when pytest-xdist spreads
    tests over workers."""
    check_grad_accumulation_equals_one_batch(setup)
    check_non_finite_step_is_skipped(setup)
    check_router_bias_follows_the_rule_only(setup)
