"""The batch ramp: its schedule, the batches it assembles from micro-batches, a ramp step equal
to a smaller batch's step, and a ramped run that resumes exactly."""

import dataclasses
import json

import chex
import jax
import numpy as np
import optax
import pytest

from mimo_jax.config import ConfigError, model_config_from_dict
from mimo_jax.data.packing import pack_documents
from mimo_jax.model.transformer import MiMoV2Flash
from mimo_jax.train import batch_ramp, trainer
from mimo_jax.train.batch_ramp import BatchRamp, RampedBatches
from mimo_jax.train.checkpoint import load_exported
from mimo_jax.train.config import train_config_from_dict
from mimo_jax.train.optimizer import make_optimizer
from mimo_jax.train.state import init_state
from mimo_jax.train.step import _micro_batches, make_train_step


def test_the_ramp_grows_linearly_in_equal_plateaus_and_counts_its_rows():
    ramp = BatchRamp(steps=12, start=1, micro_batches=4)
    assert [ramp.micro_batches_at(s) for s in range(14)] == [1] * 3 + [2] * 3 + [3] * 3 + [
        4] * 5
    assert ramp.rows_before(14, 5) == 5 * (3 * (1 + 2 + 3 + 4) + 2 * 4)
    uneven = BatchRamp(steps=10, start=3, micro_batches=16)
    counts = [uneven.micro_batches_at(s) for s in range(11)]
    assert counts[0] == 3 and counts[-1] == 16 and counts == sorted(counts)
    for rows in (1, 7, 8, 95, 96, 97, 500):
        steps = batch_ramp.steps_for_rows(rows, ramp, 2)
        assert ramp.rows_before(steps, 2) >= rows > ramp.rows_before(steps - 1, 2)
    length = batch_ramp.ramp_steps_for_rows(1000, 1, 4, 2)
    assert BatchRamp(length, 1, 4).rows_before(length, 2) >= 1000
    assert BatchRamp(length - 1, 1, 4).rows_before(length - 1, 2) < 1000


class _Stream:
    """Numbered [2, 3] micro-batches with a resumable position."""

    def __init__(self):
        self.position = 0

    def __next__(self):
        value = np.arange(6, dtype=np.int32).reshape(2, 3) + 100 * (self.position + 1)
        self.position += 1
        return {"tokens": value, "segment_ids": np.ones_like(value), "positions": value % 7}

    def get_state(self):
        return {"position": self.position}

    def set_state(self, state):
        self.position = state["position"]


def test_ramped_batches_put_the_real_micro_batches_where_the_step_reads_them():
    ramp = BatchRamp(steps=3, start=1, micro_batches=3)
    batches = RampedBatches(_Stream(), ramp, pad_id=7)
    for step, real in enumerate([1, 2, 3, 3]):
        batch = next(batches)
        chex.assert_shape(batch["tokens"], (6, 3))
        micro = _micro_batches(batch, 3)
        for a in range(3):
            if a < real:
                assert micro["segment_ids"][a].min() == 1
                assert micro["tokens"][a][0, 0] % 100 == 0  # a whole micro-batch, first row
            else:
                assert (micro["segment_ids"][a] == 0).all() and (micro["tokens"][a] == 7).all()
    assert batches.get_state() == {"micro_batches": {"position": 9}, "step": 4}
    straight = RampedBatches(_Stream(), ramp, pad_id=7)
    expected = [next(straight) for _ in range(3)]
    resumed = RampedBatches(_Stream(), ramp, pad_id=7)
    resumed.set_state({"micro_batches": {"position": 1}, "step": 1})  # after step 0's one
    chex.assert_trees_all_equal(next(resumed), expected[1])
    chex.assert_trees_all_equal(next(resumed), expected[2])


def test_a_ramp_step_equals_the_step_of_its_real_rows(micro):
    """Two of four micro-batches hold data: the update, loss and metrics are those of a
    two-micro-batch step over the same rows (the padding micro-batches are skipped)."""
    config = micro.build_config({f"model.{k}": v for k, v in micro.MICRO_MODEL.items()})
    model_config = model_config_from_dict(config.model)
    model = MiMoV2Flash(model_config)
    ramped_config = train_config_from_dict(dict(
        steps=10, learning_rate=1e-2, adam_eps=1.0, balance_loss_weight=1.0,
        bias_update_rate=0.01, grad_accum_steps=4, batch_ramp_steps=6, batch_ramp_start=2))
    plain_config = dataclasses.replace(ramped_config, grad_accum_steps=2, batch_ramp_steps=0)
    params_shape = jax.eval_shape(lambda: init_state(model, optax.identity(), 0).params)
    optimizer = make_optimizer(ramped_config, params_shape)
    state = jax.jit(lambda: init_state(model, optimizer, 0))()
    rng = np.random.default_rng(1)
    documents = [rng.integers(2, 320, size=n).astype(np.int32) for n in rng.integers(3, 40, 12)]
    rows = pack_documents(documents, 32)[:4]
    rows[3]["segment_ids"][25:] = 0
    rows[3]["positions"][25:] = 0
    micro_batches = iter([{k: np.stack([r[k] for r in rows[:2]]) for k in rows[0]},
                          {k: np.stack([r[k] for r in rows[2:]]) for k in rows[0]}])
    ramped_batch = next(RampedBatches(micro_batches, BatchRamp.from_config(ramped_config), 0))
    chex.assert_shape(ramped_batch["tokens"], (8, 32))
    # The same micro-batches for a two-micro-batch step: rows 0, 2 | 1, 3 of its batch.
    plain_batch = {k: np.stack([r[k] for r in (rows[0], rows[2], rows[1], rows[3])])
                   for k in rows[0]}

    outputs = []
    for cfg, batch in ((ramped_config, ramped_batch), (plain_config, plain_batch)):
        step = jax.jit(make_train_step(model, model_config, cfg, optimizer))
        outputs.append(step(state, batch, np.float32(1e-2)))
    (ramped, ramped_metrics), (plain, plain_metrics) = outputs
    for key in ("loss", "ce", "mtp", "balance", "grad_norm", "tokens", "max_load_violation"):
        np.testing.assert_allclose(ramped_metrics[key], plain_metrics[key], rtol=1e-6,
                                   err_msg=key)
    chex.assert_trees_all_close(ramped.params, plain.params, atol=1e-7, rtol=1e-6)
    moved = jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))), ramped.params, state.params)
    assert max(jax.tree.leaves(moved)) > 1e-4


def test_post_training_refuses_a_ramp_and_a_ramp_needs_micro_batches():
    config = train_config_from_dict(dict(steps=4, learning_rate=1e-3, grad_accum_steps=2,
                                         batch_ramp_steps=3))
    with pytest.raises(ConfigError, match=r"'train.batch_ramp_steps' = 3: the batch ramp is a "
                                          r"pretraining option; SFT"):
        batch_ramp.refuse(config, "SFT")
    with pytest.raises(ConfigError, match=r"'train.batch_ramp_steps' = 3: .*grad_accum_steps "
                                          r"> 1"):
        train_config_from_dict(dict(steps=4, learning_rate=1e-3, batch_ramp_steps=3))
    with pytest.raises(ConfigError, match=r"'train.batch_ramp_start' = 5: counts micro-batches"):
        train_config_from_dict(dict(steps=4, learning_rate=1e-3, grad_accum_steps=4,
                                    batch_ramp_steps=3, batch_ramp_start=5))


def test_a_ramped_run_trains_its_ramp_and_resumes_exactly(tmp_path, micro, corpus_dir):
    """1, 2, 3 then 4 of 4 micro-batches per step; stopped after step 2 and rerun, the run ends
    with exactly the parameters and losses of an uninterrupted one."""
    overrides = micro.micro_overrides(corpus_dir, **{
        "train.steps": 5, "train.grad_accum_steps": 4, "train.batch_ramp_steps": 4,
        "train.eval_every": 0, "train.checkpoint_every": 5, "data.batch_size": 8})
    tokens = []
    lines = []
    trainer.run(micro.build_config(overrides), tmp_path / "straight", log=lines.append,
                hooks=[lambda info: tokens.append(int(info.metrics["tokens"]))])
    assert "batch ramp: 1 x 2 rows at step 0, growing linearly to 4 x 2 by step 4" in lines
    per_row = 2 * 32  # two rows of 32 tokens a micro-batch, nearly all of them real
    assert [round(t / per_row) for t in tokens] == [1, 2, 3, 4, 4]

    stops = iter([False, True])
    first = trainer.run(micro.build_config(overrides), tmp_path / "resumed",
                        log=lambda line: None, stop_requested=lambda: next(stops, True))
    assert (first.status, first.step) == ("preempted", 2)
    second = trainer.run(micro.build_config(overrides), tmp_path / "resumed",
                         log=lambda line: None)
    assert (second.status, second.step) == ("done", 5)

    def records(name):
        lines = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
        return {r["step"]: r["loss"] for r in map(json.loads, lines) if r["kind"] == "train"}
    assert records("straight") == records("resumed")
    _, straight = load_exported(tmp_path / "straight" / "export")
    _, resumed = load_exported(tmp_path / "resumed" / "export")
    chex.assert_trees_all_equal(straight, resumed)
