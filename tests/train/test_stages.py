"""Pretraining stages (`configs/stages/`): each starts from the previous one's parameters with
`init_from`; only the fields a stage may change (RoPE theta, window) may differ, and the run
lists those that do."""

import pathlib

import chex
import jax
import numpy as np
import pytest

from configs.stages import extend_256k, mid_training, pretrain_32k
from mimo_jax.config import ConfigError, model_config_from_dict
from mimo_jax.train import init_from, trainer
from mimo_jax.train.batch_ramp import BatchRamp
from mimo_jax.train.checkpoint import CheckpointError, load_exported
from mimo_jax.train.config import train_config_from_dict
from mimo_jax.train.init_from import EXPORT


def _source(config_module) -> init_from.InitSource:
    model = model_config_from_dict(config_module.get_config().model)
    return init_from.InitSource(pathlib.Path("/stage"), EXPORT, model, None)


def test_each_stage_starts_from_the_previous_one():
    mid = model_config_from_dict(mid_training.get_config().model)
    long = model_config_from_dict(extend_256k.get_config().model)
    init_from.check_architecture(_source(pretrain_32k), mid, stage=True)
    assert init_from.stage_changes(_source(pretrain_32k), mid) == []
    init_from.check_architecture(_source(mid_training), long, stage=True)
    assert init_from.stage_changes(_source(mid_training), long) == [
        "model.full.rope_theta: checkpoint=640000.0 run=5000000.0"]
    # Outside a stage change (e.g. post-training) the theta must match.
    with pytest.raises(CheckpointError, match=r"model.full.rope_theta: checkpoint=640000.0"):
        init_from.check_architecture(_source(mid_training), long)
    config = extend_256k.get_config()
    assert (config.data.seq_len, config.data.batch_size) == (262_144, 256)
    assert config.train.bias_update_rate == 1e-5
    assert (config.train.learning_rate, config.train.end_learning_rate) == (3e-5, 1e-5)
    assert config.train.batch_ramp_steps == mid_training.get_config().train.batch_ramp_steps == 0


def test_stage_one_ramps_the_batch_over_500b_tokens_and_schedules_in_tokens():
    train = train_config_from_dict(pretrain_32k.get_config().train)
    ramp = BatchRamp.from_config(train)
    rows, seq = 2048 // 16, pretrain_32k.SEQ_LEN
    assert (ramp.start, ramp.micro_batches) == (1, 16)
    tokens = lambda step: ramp.rows_before(step, rows) * seq  # noqa: E731
    assert tokens(ramp.steps - 1) < 500e9 <= tokens(ramp.steps)
    warmup = round(train.warmup_fraction * train.steps)
    assert tokens(warmup - 1) < 50e9 <= tokens(warmup)
    decay = round(train.decay_start_fraction * train.steps)
    assert tokens(decay - 1) < 50e9 + 12e12 <= tokens(decay)
    assert tokens(train.steps - 1) < 22e12 <= tokens(train.steps)


def test_a_stage_refuses_another_architecture():
    config = extend_256k.get_config()
    config.model.num_experts = 128
    with pytest.raises(CheckpointError, match=r"model.num_experts: checkpoint=256 run=128"):
        init_from.check_architecture(_source(mid_training),
                                     model_config_from_dict(config.model), stage=True)


def test_pretraining_continues_a_short_stage_at_4x_the_length(tmp_path, micro, corpus_dir):
    """A micro run at 32 tokens, then a stage from its workdir at 128 tokens with the global
    layers' theta raised: the run says what changed, keeps the first stage's tokenizer, starts
    from exactly the saved parameters (router biases included) with a fresh optimizer, and
    trains."""
    first = micro.build_config(micro.micro_overrides(corpus_dir, **{
        "train.steps": 3, "train.eval_every": 0, "train.checkpoint_every": 3}))
    trainer.run(first, tmp_path / "short", log=lambda line: None)
    _, saved = load_exported(tmp_path / "short" / "export")

    second = micro.build_config(micro.micro_overrides(corpus_dir, **{
        "init_from": str(tmp_path / "short"), "model.full.rope_theta": 5_000_000.0,
        "data.tokenizer": "",  # the previous stage's tokenizer
        "data.seq_len": 128, "train.steps": 2, "train.eval_every": 0,
        "train.checkpoint_every": 2}))
    lines = []
    result = trainer.run(second, tmp_path / "long", log=lines.append)
    assert result.status == "done" and result.step == 2
    said = "\n".join(lines)
    assert "stage changes: model.full.rope_theta: checkpoint=640000.0 run=5000000.0" in said
    assert f"tokenizer: {tmp_path / 'short' / 'tokenizer.json'}" in said

    configs = trainer.build_configs(second)
    program = trainer.step_program(configs, trainer.partition.make_parallelism(
        configs.mesh, 1), configs.train.seed)
    source = init_from.locate(str(tmp_path / "short"), configs.model)
    state = trainer.params_initial_state(source, 0, lambda line: None, stage=True)(program)
    chex.assert_trees_all_equal(jax.device_get(state.params), saved)
    assert int(state.step) == 0
    moments = [np.abs(np.asarray(x)).max() for x in jax.tree.leaves(state.opt_state)
               if np.asarray(x).dtype == np.float32 and np.asarray(x).ndim]
    assert moments and max(moments) == 0.0  # a fresh AdamW state


def test_a_stage_can_carry_the_previous_stages_optimizer_state(tmp_path, micro, corpus_dir):
    """`init_from_optimizer=True`: the next stage starts from the saved AdamW moments and count
    (not zeros) with step 0; an export, which holds no optimizer state, is refused before any
    compilation, and so is the switch in a post-training config."""
    first = micro.build_config(micro.micro_overrides(corpus_dir, **{
        "train.steps": 2, "train.eval_every": 0, "train.checkpoint_every": 2}))
    trainer.run(first, tmp_path / "short", log=lambda line: None)
    configs = trainer.build_configs(first)
    program = trainer.step_program(configs, trainer.partition.make_parallelism(
        configs.mesh, 1), configs.train.seed)
    saved = trainer.Checkpointer(tmp_path / "short", configs.train).restore_state(
        2, trainer.abstract_with_shardings(program.abstract_state, program.state_shardings))

    overrides = {"init_from": str(tmp_path / "short"), "init_from_optimizer": True,
                 "model.full.rope_theta": 5_000_000.0, "train.steps": 1,
                 "train.eval_every": 0}
    second = micro.build_config(micro.micro_overrides(corpus_dir, **overrides))
    started = []
    lines = []
    trainer.run(second, tmp_path / "long", log=lines.append,
                hooks=[_OnStart(started.append)])
    state = started[0]
    assert int(state.step) == 0
    chex.assert_trees_all_equal(state.opt_state, jax.device_get(saved.opt_state))
    assert any(np.abs(np.asarray(x)).max() > 0 for x in jax.tree.leaves(state.opt_state)
               if np.asarray(x).ndim)
    assert any("with its optimizer state" in line for line in lines)

    from_export = micro.build_config(micro.micro_overrides(corpus_dir, **dict(
        overrides, init_from=str(tmp_path / "short" / "export"))))
    with pytest.raises(CheckpointError, match=r"init_from_optimizer=True reads the optimizer "
                                              r"state of a training checkpoint.*params export"):
        trainer.run(from_export, tmp_path / "from_export", log=lambda line: None)
    no_source = micro.build_config(micro.micro_overrides(corpus_dir, **dict(
        overrides, init_from="")))
    with pytest.raises(ConfigError, match=r"'init_from_optimizer' is True but 'init_from' is "
                                          r"empty"):
        trainer.run(no_source, tmp_path / "no_source", log=lambda line: None)
    with pytest.raises(ConfigError, match=r"'init_from_optimizer' is True, but SFT starts"):
        init_from.refuse_optimizer_carry(second, "SFT")


class _OnStart(trainer.Hook):
    """Hands the loop's initial state to `keep`, copied to the host (the step donates it)."""

    def __init__(self, keep):
        self._keep = keep

    def on_start(self, info):
        self._keep(jax.device_get(info.state))
