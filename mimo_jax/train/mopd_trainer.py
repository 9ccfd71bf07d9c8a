"""The MOPD trainer: multi-teacher on-policy distillation (report section 4.4), and RL with
outcome rewards, on the one training loop.

    python -m mimo_jax.train.mopd --config configs/mopd_tiny.py --workdir DIR

The student starts from `config.init_from` (a params export, a training workdir or a Hugging
Face directory); each domain's teacher is loaded from `mopd.teachers` and stays frozen; every
teacher must use the student's tokenizer. Each step (`mopd_step.MopdStep`) samples
`mopd.samples_per_prompt` responses to `mopd.prompts_per_domain` prompts of every domain,
scores them with the domain's teacher and its outcome reward, and updates the student. With
`mopd.use_teacher=False` it is ORM-only RL (GRPO); with `mopd.alpha=0` MOPD without outcome rewards.

Checkpoints hold the train state (its RNG key drives the sampling) and the prompt stream's
position, so a run killed at any point and started again continues exactly. Held-out accuracy
per domain (greedy answers to the task's test split) is the evaluation.

The run uses the config's mesh over `train.num_devices` devices of this host (the CPU configs
say 1): the student and every teacher split by the rule preset, rollouts and teacher scores
decoded on the mesh (`inference.on_mesh`), the update jitted with the train state's shardings.
Each domain's rows (prompts x samples) must split over the mesh's batch axes. Multi-host runs
are not supported yet (rewards are computed from every row on one host).
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any, Callable

import jax
import ml_collections
import numpy as np

from mimo_jax.config import (ConfigError, ModelConfig, architecture, model_config_from_dict,
                             replace_model)
from mimo_jax.config_reader import read_section
from mimo_jax.data.prompts import PromptStream, prompt_pool
from mimo_jax.data.tokenizer import TextTokenizer, load_tokenizer
from mimo_jax.eval.task_eval import task_accuracy
from mimo_jax.eval.tasks import get_reward, get_task
from mimo_jax.inference import on_mesh
from mimo_jax.model.transformer import MiMoV2Flash
from mimo_jax.parallel import MeshConfig, Parallelism, mesh_config_from_dict
from mimo_jax.train import batch_ramp, init_from, partition
from mimo_jax.train.checkpoint import EXPORT_DIR, Checkpointer, CheckpointError
from mimo_jax.train.config import TrainConfig, train_config_from_dict
from mimo_jax.train.hooks import (Checkpoint, Evaluation, ExportParams, MetricsLog,
                                  NonFiniteSteps, PlotCurves, Preemption)
from mimo_jax.train.loop import TrainLoop
from mimo_jax.train.metrics import MetricsWriter, Progress
from mimo_jax.train.mopd_config import MopdConfig
from mimo_jax.train.mopd_objective import MopdObjective
from mimo_jax.train.mopd_step import MopdStep, Teacher, make_update
from mimo_jax.train.optimizer import learning_rate_schedule, make_optimizer
from mimo_jax.train.state import TrainState, init_state, state_from_params
from mimo_jax.train.trainer import (RunResult, abstract_with_shardings, resume_batches,
                                    save_config)

TOKENIZER_FILE = "tokenizer.json"


@dataclasses.dataclass(frozen=True)
class MopdConfigs:
    """The frozen sections of an MOPD run config."""

    model: ModelConfig
    train: TrainConfig
    mopd: MopdConfig
    init_from: str
    mesh: MeshConfig


def build_configs(config: ml_collections.ConfigDict) -> MopdConfigs:
    """The validated model/train/mopd sections; a bad value raises `ConfigError` naming it."""
    for section in ("model", "train", "mopd"):
        if section not in config:
            raise ConfigError(f"config has no {section!r} section")
    init_path = str(config.get("init_from") or "")
    init_from.refuse_optimizer_carry(config, "MOPD")
    if not init_path:
        raise ConfigError("config key 'init_from' is empty: MOPD starts from a trained student "
                          "(a params export, a training workdir or a Hugging Face directory)")
    train_config = train_config_from_dict(config.train)
    batch_ramp.refuse(train_config, "MOPD")
    return MopdConfigs(model=model_config_from_dict(config.model), train=train_config,
                       mopd=read_section(MopdConfig, config.mopd), init_from=init_path,
                       mesh=mesh_config_from_dict(config.get("mesh")))


def _parallelism(configs: MopdConfigs) -> Parallelism:
    """The run's mesh; each domain's rows (prompts x samples) must split over its batch axes,
    and so must the rows of each update's minibatch."""
    parallelism = partition.make_parallelism(configs.mesh, configs.train.num_devices)
    mopd = configs.mopd
    rows = mopd.prompts_per_domain * mopd.samples_per_prompt
    shards = on_mesh.batch_shards(parallelism)
    if rows % shards:
        raise ConfigError(f"config key 'mopd.prompts_per_domain' = {mopd.prompts_per_domain}: a "
                          f"domain's rows (x mopd.samples_per_prompt={mopd.samples_per_prompt} = "
                          f"{rows}) must split over the mesh's {shards} batch shards")
    minibatch = rows * len(mopd.domains) // mopd.updates_per_step
    if minibatch % shards:
        raise ConfigError(f"config key 'mopd.updates_per_step' = {mopd.updates_per_step}: a "
                          f"minibatch of {minibatch} rows does not split over the mesh's "
                          f"{shards} batch shards")
    return parallelism


def _load_tokenizer(source: init_from.InitSource, what: str) -> TextTokenizer:
    if source.tokenizer_file is None:
        raise CheckpointError(f"{what} {source.path} has no tokenizer.json beside its parameters; "
                              "MOPD decodes responses to reward them")
    return load_tokenizer(source.tokenizer_file)


def load_teachers(mopd: MopdConfig, student: ModelConfig, tokenizer: TextTokenizer,
                  log: Callable[[str], None],
                  parallelism: Parallelism | None = None) -> dict[str, Teacher | None]:
    """Each domain's frozen teacher (any size, computed with the student's runtime choices,
    dropless on a mesh that splits the experts), checked to share the student's tokenizer, its
    parameters split over `parallelism`'s mesh (None: the default device); None for every
    domain when the teacher term is off. Teachers given by the same path load once."""
    if not mopd.use_teacher:
        return {domain: None for domain in mopd.domains}
    loaded: dict[str, Teacher] = {}
    teachers = {}
    for domain in mopd.domains:
        path = mopd.teacher(domain)
        if path not in loaded:
            if not pathlib.Path(path).exists():
                raise CheckpointError(f"teacher of domain {domain!r}: {path!r} does not exist")
            source = init_from.locate(path, student)
            theirs = _load_tokenizer(source, f"teacher of domain {domain!r},")
            if theirs.fingerprint() != tokenizer.fingerprint():
                raise CheckpointError(
                    f"teacher of domain {domain!r} ({path}) uses tokenizer {theirs.source!r}, "
                    f"the student {tokenizer.source!r}: they must share one tokenizer")
            config = replace_model(source.model_config, runtime=student.runtime)
            shardings = None
            if parallelism is not None:
                config = on_mesh.decoding_config(config, parallelism)
                shardings = parallelism.param_shardings(MiMoV2Flash(config))[1]
            loaded[path] = Teacher(MiMoV2Flash(config),
                                   init_from.load_params(source, config, shardings=shardings))
            log(f"teacher of {domain}: {source.describe()}")
        teachers[domain] = loaded[path]
    return teachers


def _held_out(mopd: MopdConfig) -> dict[str, list]:
    """Each built-in task domain's held-out examples for evaluation (JSONL domains have none)."""
    out = {}
    for domain in mopd.domains:
        kind, arg = mopd.prompt_source(domain)
        if kind == "task" and mopd.eval_prompts:
            out[domain] = get_task(arg).examples(mopd.seed, mopd.eval_prompts, "test")
    return out


class HeldOutAccuracy:
    """Greedy held-out accuracy per domain, as the `Evaluation` hook's `evaluate(params)`."""

    def __init__(self, model: MiMoV2Flash, tokenizer: TextTokenizer, examples: dict[str, list],
                 max_new_tokens: int, parallelism: Parallelism | None = None):
        self._model, self._tokenizer = model, tokenizer
        self._examples, self._max_new_tokens = examples, max_new_tokens
        self._parallelism = parallelism

    def __call__(self, params: Any) -> dict[str, float]:
        result = {f"accuracy/{domain}": task_accuracy(
            self._model, params, self._tokenizer, examples, max_new_tokens=self._max_new_tokens,
            parallelism=self._parallelism) for domain, examples in self._examples.items()}
        # `loss` is what the Evaluation hook reports and keeps: here the mean error rate.
        result["loss"] = 1.0 - float(np.mean(list(result.values())))
        return result


def _describe_accuracy(result: dict[str, float]) -> str:
    return "held-out accuracy " + ", ".join(f"{key.split('/', 1)[1]} {value:.3f}"
                                            for key, value in result.items() if "/" in key)


def run(config: ml_collections.ConfigDict, workdir: str | pathlib.Path, *,
        stop_requested: Callable[[], bool] = lambda: False,
        log: Callable[[str], None] = print) -> RunResult:
    """Trains (or resumes) the student as `config` says, in `workdir`."""
    configs = build_configs(config)
    model_cfg, train_cfg, mopd = configs.model, configs.train, configs.mopd
    rewards = {domain: get_reward(mopd.reward(domain)) for domain in mopd.domains}
    workdir = pathlib.Path(workdir).absolute()
    workdir.mkdir(parents=True, exist_ok=True)
    save_config(config, workdir)

    # Everything that reads the disk before any compilation: bad paths fail in seconds.
    source = init_from.locate(configs.init_from, model_cfg)
    init_from.check_architecture(source, model_cfg)
    tokenizer = _load_tokenizer(source, "init_from")
    tokenizer.save(workdir / TOKENIZER_FILE)
    pools = {domain: prompt_pool(*mopd.prompt_source(domain), seed=mopd.seed)
             for domain in mopd.domains}
    parallelism = _parallelism(configs)
    teachers = load_teachers(mopd, model_cfg, tokenizer, log, parallelism)
    log(f"student: {source.describe()}; domains {', '.join(mopd.domains)}; "
        f"{mopd.prompts_per_domain} prompts x {mopd.samples_per_prompt} samples per domain "
        f"per step; {parallelism.mesh.size} device(s)")

    model = MiMoV2Flash(model_cfg)
    params_shape, param_shardings = parallelism.param_shardings(model)
    optimizer = make_optimizer(train_cfg, params_shape)
    abstract = jax.eval_shape(lambda: init_state(model, optimizer, train_cfg.seed))
    state_shardings = parallelism.state_shardings(abstract, params_shape, param_shardings)
    objective = MopdObjective(alpha=mopd.alpha, eps_low=mopd.eps_low, eps_high=mopd.eps_high,
                              use_teacher=mopd.use_teacher)
    # The batch arrives placed (`MopdStep`): its shardings are the arrays' own.
    update = parallelism.jit(make_update(model, model_cfg, train_cfg, objective, optimizer,
                                         len(mopd.domains), mopd.routing_replay),
                             (state_shardings, None, parallelism.replicated),
                             (state_shardings, parallelism.replicated))
    step = MopdStep(model, update, teachers, rewards, tokenizer, mopd, parallelism)

    checkpointer = Checkpointer(workdir, train_cfg)
    meta = {"architecture": architecture(model_cfg), "tokenizer": tokenizer.fingerprint(),
            "data_stream": {"domains": list(mopd.domains), "prompts": dict(mopd.prompts),
                            "prompts_per_domain": mopd.prompts_per_domain, "seed": mopd.seed}}
    try:
        start = checkpointer.latest_step() or 0
        batches = resume_batches(checkpointer, start, meta, lambda: PromptStream(
            pools, mopd.prompts_per_domain, mopd.seed))
        if start:
            state = checkpointer.restore_state(start,
                                               abstract_with_shardings(abstract, state_shardings))
            log(f"resumed from {checkpointer.directory / str(start)}")
        else:
            params = init_from.load_params(source, model_cfg, shardings=param_shardings)
            state = parallelism.jit(lambda p: state_from_params(p, optimizer, train_cfg.seed),
                                    (param_shardings,), state_shardings)(params)
        return _train(state, batches, step, start, configs, workdir, checkpointer, meta,
                      tokenizer, stop_requested)
    finally:
        checkpointer.close()


def _train(state: TrainState, batches, step: MopdStep, start: int, configs: MopdConfigs,
           workdir: pathlib.Path, checkpointer: Checkpointer, meta: dict,
           tokenizer: TextTokenizer, stop_requested: Callable[[], bool]) -> RunResult:
    """The loop with MOPD's hooks: log, non-finite rule, save, preemption, held-out accuracy;
    export and plot at the end."""
    train_cfg, mopd = configs.train, configs.mopd
    writer = MetricsWriter(workdir, start, train_cfg.tensorboard)
    progress = Progress(train_cfg.progress, start, train_cfg.steps, train_cfg.log_every)
    try:
        loop = TrainLoop(step, steps=train_cfg.steps,
                         learning_rate=learning_rate_schedule(train_cfg), say=progress.message)
        loop.add_hook(MetricsLog(writer, progress, steps=train_cfg.steps,
                                 log_every=train_cfg.log_every, record_keys=step.record_keys))
        non_finite = loop.add_hook(NonFiniteSteps(train_cfg.max_nan_steps, checkpointer,
                                                  progress.message))
        checkpoint = loop.add_hook(Checkpoint(checkpointer, meta, last_saved=start or None),
                                   every=train_cfg.checkpoint_every)
        loop.add_hook(Preemption(stop_requested))
        held_out = _held_out(mopd)
        evaluation = None
        if held_out:
            accuracy = HeldOutAccuracy(step.model, tokenizer, held_out, mopd.max_response_tokens,
                                       step.parallelism)
            evaluation = loop.add_hook(
                Evaluation(accuracy, writer, progress.message, at_start=train_cfg.eval_every > 0,
                           describe=_describe_accuracy), every=train_cfg.eval_every)
        export = plot = None
        if train_cfg.export_params:
            export = loop.add_hook(ExportParams(workdir / EXPORT_DIR, configs.model,
                                                workdir / TOKENIZER_FILE), every=0)
        if train_cfg.plot:
            plot = loop.add_hook(PlotCurves(workdir), every=0)
        end = loop.run(state, batches, start)
    finally:
        progress.close()
        writer.close()
    return RunResult(status="done" if end.done else "preempted", step=end.info.step,
                     workdir=workdir, last_checkpoint=checkpoint.last_saved,
                     eval_loss=evaluation.final_loss if evaluation else None,
                     first_eval_loss=evaluation.first_loss if evaluation else None,
                     plot=plot.path if plot else None, export=export.path if export else None,
                     skipped_steps=non_finite.skipped)
