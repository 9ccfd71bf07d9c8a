"""Pretraining, the training loop's first user: build everything from one config, resume if a
checkpoint exists, train.

`run(config, workdir)` is what `python -m mimo_jax.train.pretrain` calls; tests call it too. It
checks the config, the data and the checkpoint directory before any compilation, builds the
step program (`step_program`, shared with the throughput benchmark), and runs `loop.TrainLoop`
with the standard hooks of `hooks.py`.

The part after the data is known to be good is shared with the other trainers (SFT): a
`RunSetup` says what differs (the first state, the held-out batches, the logged metrics) and
`train` builds the step program and runs the loop with the standard hooks.

Ends:
  done       `train.steps` reached: final eval, final checkpoint, params export, plot.
  preempted  `stop_requested()` turned true (SIGTERM), or JAX's preemption service says so on a
             multi-host run: checkpoint at the current step, return.
  errors     bad data mid-run: checkpoint at the last finished step, then the `DataError`;
             `max_nan_steps` non-finite steps in a row: `TrainingStopped`, no new checkpoint
             (the last good one stays the latest).
"""

from __future__ import annotations

import dataclasses
import math
import pathlib
from typing import Any, Callable, Sequence

import jax
import ml_collections
import numpy as np
import optax

from mimo_jax.config import ConfigError, ModelConfig, model_config_from_dict, with_runtime
from mimo_jax.data import pipeline
from mimo_jax.data.config import DataConfig, data_config_from_dict
from mimo_jax.data.errors import DataError
from mimo_jax.model.transformer import MiMoV2Flash
from mimo_jax.parallel import MeshConfig, Parallelism, mesh_config_from_dict
from mimo_jax.train import init_from, partition
from mimo_jax.train.batch_ramp import BatchRamp, RampedBatches
from mimo_jax.train.checkpoint import EXPORT_DIR, CheckpointError, Checkpointer, architecture
from mimo_jax.train.config import TrainConfig, train_config_from_dict
from mimo_jax.train.hooks import (Checkpoint, Evaluation, ExportParams, MetricsLog,
                                  NonFiniteSteps, PlotCurves, Preemption)
from mimo_jax.train.loop import Batches, Hook, LoopEnd, StepInfo, TrainingStopped, TrainLoop
from mimo_jax.train.metrics import TENSORBOARD_DIR, MetricsWriter, Progress
from mimo_jax.train.optimizer import learning_rate_schedule, make_optimizer
from mimo_jax.train.state import TrainState, init_state, state_from_params
from mimo_jax.train.step import make_eval_step, make_train_step

# `TrainingStopped` is raised by `run` (the non-finite rule); callers catch it from here.
__all__ = ["CONFIG_FILE", "TRAIN_RECORD_KEYS", "RunConfigs", "RunResult", "RunSetup",
           "StepProgram", "TrainingStopped", "build_configs", "resume_batches", "run",
           "save_config", "step_program", "summary_lines", "train"]

CONFIG_FILE = "config.json"
# The pretraining step's metrics that go into each "train" record of metrics.jsonl.
TRAIN_RECORD_KEYS = ("loss", "ce", "mtp", "balance", "grad_norm", "learning_rate",
                     "max_load_violation", "dropped_copies")


@dataclasses.dataclass(frozen=True)
class RunConfigs:
    model: ModelConfig
    data: DataConfig
    train: TrainConfig
    mesh: MeshConfig


@dataclasses.dataclass
class RunResult:
    """What a finished (or preempted) run did."""

    status: str  # "done" | "preempted"
    step: int
    workdir: pathlib.Path
    last_checkpoint: int | None
    eval_loss: float | None = None
    first_eval_loss: float | None = None
    plot: pathlib.Path | None = None
    export: pathlib.Path | None = None
    skipped_steps: int = 0


def build_configs(config: ml_collections.ConfigDict) -> RunConfigs:
    """The frozen, validated model/data/train configs; a bad value raises `ConfigError`."""
    for section in ("model", "data", "train"):
        if section not in config:
            raise ConfigError(f"config has no {section!r} section")
    model = model_config_from_dict(config.model)
    train_config = train_config_from_dict(config.train)
    if train_config.compute_dtype:
        model = with_runtime(model, dtype=train_config.compute_dtype)
    return RunConfigs(model=model, data=data_config_from_dict(config.data), train=train_config,
                      mesh=mesh_config_from_dict(config.get("mesh")))


def save_config(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> None:
    """Writes the run config as `<workdir>/config.json` (atomically)."""
    path = workdir / CONFIG_FILE
    tmp = path.with_name(CONFIG_FILE + ".tmp")
    tmp.write_text(config.to_json_best_effort(indent=2, sort_keys=True))
    tmp.replace(path)


def _data_stream(config: DataConfig, shard: pipeline.ProcessShard,
                 ramp: BatchRamp | None = None) -> dict[str, Any]:
    """The data settings a saved iterator position depends on (JSON-ready); a ramped run reads
    micro-batches, whose count per batch is part of its position."""
    keys = ("seq_len", "batch_size", "shuffle", "seed", "num_workers", "max_document_bytes",
            "text_document", "jsonl_field", "add_eos", "seqio_split", "seqio_feature")
    stream = {k: getattr(config, k) for k in keys}
    stream["train_sources"] = ",".join(str(s) for s in config.train_sources)
    stream["process_count"] = shard.count
    if ramp is not None and ramp.steps:
        stream["ramp_micro_batches"] = ramp.micro_batches
    return stream


def _train_batches(data_cfg: DataConfig, ramp: BatchRamp, sources: list, tokenizer: Any,
                   vocab_size: int, shard: pipeline.ProcessShard) -> Any:
    """The run's training batch iterator: the pipeline's batches, or under the batch ramp the
    ramp's batches assembled from the pipeline's micro-batches."""
    if not ramp.steps:
        return iter(pipeline.train_batches(data_cfg, sources, tokenizer, vocab_size, shard))
    micro = pipeline.train_batches(data_cfg, sources, tokenizer, vocab_size, shard,
                                   micro_batches=ramp.micro_batches)
    return RampedBatches(iter(micro), ramp, tokenizer.pad_id if tokenizer is not None else 0)


def abstract_with_shardings(abstract: Any, shardings: Any) -> Any:
    """`abstract` (ShapeDtypeStructs) with each leaf's sharding from `shardings` (what a
    checkpoint restores into)."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        abstract, shardings)


@dataclasses.dataclass(frozen=True)
class StepProgram:
    """What a run trains with: the model, its optimizer, the abstract state and its shardings,
    the batch sharding and the jitted train step (the throughput benchmark times this step)."""

    model: MiMoV2Flash
    params_shape: Any
    optimizer: optax.GradientTransformation
    abstract_state: Any
    state_shardings: Any
    batch_sharding: Any
    train_step: Callable

    def initial_state(self, seed: int) -> TrainState:
        """Fresh parameters from `seed` and a zero optimizer state, in the state's shardings."""
        return jax.jit(lambda: init_state(self.model, self.optimizer, seed),
                       out_shardings=self.state_shardings)()

    def state_with_params(self, params: Any, seed: int) -> TrainState:
        """A fresh run's state around loaded `params` (in `state_shardings.params`): a zero
        optimizer state, step 0, and the RNG key of `initial_state(seed)`."""
        return jax.jit(lambda p: state_from_params(p, self.optimizer, seed),
                       out_shardings=self.state_shardings)(params)

    def global_batch(self, local_batch: dict[str, np.ndarray],
                     parallelism: Parallelism) -> dict[str, jax.Array]:
        """Per-process numpy rows -> one global jax.Array per key."""
        return parallelism.put_batch(local_batch,
                                     {k: self.batch_sharding for k in local_batch})


def step_program(configs: RunConfigs, parallelism: Parallelism, seed: int, *,
                 count_zero_grads: bool = False) -> StepProgram:
    """Traces the model's parameters once and builds the train step under the mesh and rules
    (`count_zero_grads`: see `step.make_train_step`)."""
    model = MiMoV2Flash(configs.model)
    params_shape, param_shardings = parallelism.param_shardings(model)
    optimizer = make_optimizer(configs.train, params_shape)
    abstract_state = jax.eval_shape(lambda: init_state(model, optimizer, seed))
    state_shardings = parallelism.state_shardings(abstract_state, params_shape, param_shardings)
    batch_sharding = partition.batch_sharding(parallelism)
    # Traced under the mesh and the logical rules (the model's sharding constraints,
    # expert-parallel dispatch and context-parallel attention), with explicit shardings.
    train_step = parallelism.jit_train_step(
        make_train_step(model, configs.model, configs.train, optimizer,
                        count_zero_grads=count_zero_grads),
        state_shardings, batch_sharding, extra_args=1)
    return StepProgram(model, params_shape, optimizer, abstract_state, state_shardings,
                       batch_sharding, train_step)


def run(config: ml_collections.ConfigDict, workdir: str | pathlib.Path, *,
        stop_requested: Callable[[], bool] = lambda: False,
        log: Callable[[str], None] = print,
        hooks: Sequence[Hook | Callable[[StepInfo], None]] = ()) -> RunResult:
    """Trains (or resumes training) as `config` says, in `workdir`; `hooks` (a `Hook`, or a
    function of `StepInfo`) run after every step, after the standard ones."""
    configs = build_configs(config)
    model_cfg, data_cfg, train_cfg = configs.model, configs.data, configs.train
    init_path = init_from.init_from_path(config)
    carry_optimizer = init_from.carries_optimizer(config)
    if carry_optimizer and not init_path:
        raise ConfigError(f"config key '{init_from.OPTIMIZER_KEY}' is True but 'init_from' is "
                          "empty: there is no optimizer state to carry")
    workdir = pathlib.Path(workdir).absolute()
    is_first = jax.process_index() == 0
    if is_first:
        workdir.mkdir(parents=True, exist_ok=True)
        save_config(config, workdir)

    parallelism = partition.make_parallelism(configs.mesh, train_cfg.num_devices)
    partition.check_batch(data_cfg.batch_size, data_cfg.seq_len, train_cfg.grad_accum_steps,
                          parallelism)
    shard = pipeline.ProcessShard.from_jax()

    # Data first: a bad path fails in seconds, before any compilation.
    train_sources = pipeline.open_sources(data_cfg, "train")
    eval_sources = pipeline.open_sources(data_cfg, "eval") if data_cfg.eval_batches else []
    source = init_from.locate(init_path, model_cfg) if init_path else None
    if source is not None and source.tokenizer_file is not None and not data_cfg.tokenizer:
        # A stage keeps the previous stage's token ids (instead of training a new tokenizer).
        data_cfg = dataclasses.replace(data_cfg, tokenizer=str(source.tokenizer_file))
    tokenizer = pipeline.resolve_tokenizer(data_cfg, model_cfg.vocab_size, workdir,
                                           train_sources, save=is_first)
    log("data:\n" + pipeline.describe_sources(train_sources))
    if tokenizer is not None:
        log(f"tokenizer: {tokenizer.source} ({tokenizer.vocab_size} ids)")

    checkpointer = Checkpointer(workdir, train_cfg)
    ramp = BatchRamp.from_config(train_cfg)
    meta = {"architecture": architecture(model_cfg),
            "tokenizer": tokenizer.fingerprint() if tokenizer is not None else None,
            "data_stream": _data_stream(data_cfg, shard, ramp)}
    batches = None
    try:  # the checkpointer's background threads are stopped however the run ends
        start = checkpointer.latest_step() or 0
        source = _stage_source(source, start, model_cfg, tokenizer, log, carry_optimizer)
        batches = resume_batches(checkpointer, start, meta, lambda: _train_batches(
            data_cfg, ramp, train_sources, tokenizer, model_cfg.vocab_size, shard))
        if start < train_cfg.steps:
            batches.read_ahead()  # the first batch before any compilation: bad data fails fast
        eval_batches = None
        if eval_sources:
            eval_batches = lambda: pipeline.eval_batches(  # noqa: E731
                data_cfg, eval_sources, tokenizer, model_cfg.vocab_size, shard)
        setup = RunSetup(configs, workdir, parallelism, checkpointer, meta, start,
                         initial_state=params_initial_state(
                             source, train_cfg.seed, log, stage=True,
                             carry_optimizer=carry_optimizer),
                         eval_batches=eval_batches, hooks=tuple(hooks))
        return train(setup, batches, stop_requested, log)
    finally:
        if batches is not None:
            batches.close()
        checkpointer.close()


def _stage_source(source: init_from.InitSource | None, start: int, model_config: ModelConfig,
                  tokenizer: Any, log: Callable[[str], None],
                  carry_optimizer: bool = False) -> init_from.InitSource | None:
    """`source` (the previous pretraining stage's parameters, from `init_from`) for a fresh
    run, after checking the architecture (the stage fields may change; the ones that do are
    listed), the tokenizer, and with `carry_optimizer` that it holds an optimizer state. None
    for a resumed run or without init_from."""
    if source is None:
        return None
    if start:
        log(f"resuming from checkpoint step {start}; init_from {source.path} is not read")
        return None
    init_from.check_architecture(source, model_config, stage=True)
    init_from.check_tokenizer(source, tokenizer)
    if carry_optimizer:
        init_from.check_optimizer_source(source)
    changes = init_from.stage_changes(source, model_config)
    log(f"init_from: {source.describe()}; "
        + (f"stage changes: {'; '.join(changes)}" if changes else "same architecture"))
    return source


def params_initial_state(source: init_from.InitSource | None, seed: int,
                         log: Callable[[str], None], *, copy_mtp_head: bool = False,
                         stage: bool = False, carry_optimizer: bool = False
                         ) -> Callable[[StepProgram], TrainState]:
    """A fresh run's first state: `source`'s parameters (in the step program's shardings) with a
    new optimizer state (`carry_optimizer`: the one saved with them), step 0 and an RNG from
    `seed`; a random initialisation from `seed` when there is no source. `copy_mtp_head`,
    `stage`: see `init_from.load_params`."""
    def initial_state(program: StepProgram) -> TrainState:
        if source is None:
            return program.initial_state(seed)
        params = init_from.load_params(source, program.model.config,
                                       shardings=program.state_shardings.params,
                                       copy_mtp_head=copy_mtp_head, stage=stage)
        state = program.state_with_params(params, seed)
        if carry_optimizer:
            state = state.replace(opt_state=init_from.load_optimizer_state(
                source, abstract_with_shardings(program.abstract_state.opt_state,
                                                program.state_shardings.opt_state)))
        log(f"initialised from {source.describe()}"
            + (" with its optimizer state" if carry_optimizer else ""))
        return state
    return initial_state


def resume_batches(checkpointer: Checkpointer, start: int, meta: dict[str, Any],
                   make_iterator: Callable[[], Any]) -> Batches:
    """The training batches from `make_iterator()` standing after batch `start`: a fresh run's
    (start 0) from the beginning, a resumed run's at the position saved in checkpoint `start`,
    once `checkpointer.check` has found that checkpoint written for `meta`'s model, tokenizer
    and data stream."""
    data_state = None
    if start:
        checkpointer.check(start, meta)
        data_state = checkpointer.restore_data_state(start)
    try:
        return Batches(make_iterator(), data_state)
    except (KeyError, IndexError, TypeError, ValueError) as err:
        if isinstance(err, DataError) or data_state is None:
            raise
        raise CheckpointError(f"the data position saved in checkpoint "
                              f"{checkpointer.directory / str(start)} does not fit this data "
                              f"pipeline: {type(err).__name__}: {err}") from err


@dataclasses.dataclass(frozen=True)
class RunSetup:
    """What a trainer checked before any compilation, and what its run does differently.

    start:          the step restored from (0 for a fresh run).
    initial_state:  a fresh run's first state, given the step program (e.g. new parameters from
                    the seed, or loaded ones with a new optimizer state).
    eval_batches:   () -> the held-out per-process batches (the same every call); None: no
                    evaluation.
    record_keys:    the step's metrics written to each "train" record.
    progress_keys:  the step's metrics shown on the progress line after the loss.
    count_zero_grads: the step reports `zero_grad_params`.
    hooks:          the caller's own (a `Hook`, or a function of `StepInfo`), called after every
                    step, after the standard hooks (e.g. a notebook's live loss plot).
    """

    configs: RunConfigs
    workdir: pathlib.Path
    parallelism: Parallelism
    checkpointer: Checkpointer
    meta: dict
    start: int
    initial_state: Callable[[StepProgram], TrainState]
    eval_batches: Callable[[], Any] | None = None
    record_keys: tuple[str, ...] = TRAIN_RECORD_KEYS
    progress_keys: tuple[str, ...] = ()
    count_zero_grads: bool = False
    hooks: Sequence[Hook | Callable[[StepInfo], None]] = ()


class _HeldOutLoss:
    """The eval losses of some parameters over the eval batches (read once, on first use)."""

    def __init__(self, setup: RunSetup, program: StepProgram):
        self._setup = setup
        self._program = program
        self._eval_step = setup.parallelism.jit_eval_step(
            make_eval_step(program.model, setup.configs.model), program.state_shardings.params,
            program.batch_sharding)
        self._batches: list[dict[str, np.ndarray]] = []

    def __call__(self, params: Any) -> dict[str, Any]:
        """{"loss", "perplexity", "tokens"} and, with MTP heads, "mtp_loss" (their mean)."""
        setup = self._setup
        if not self._batches:
            self._batches = list(setup.eval_batches())
        sums = counts = 0.0
        for batch in self._batches:
            out = self._eval_step(params, self._program.global_batch(batch, setup.parallelism))
            sums, counts = sums + out["sums"], counts + out["counts"]
        sums, counts = np.asarray(sums, np.float64), np.asarray(counts, np.float64)
        means = sums / np.maximum(counts, 1.0)
        result = {"loss": float(means[0]), "perplexity": float(math.exp(min(means[0], 50.0))),
                  "tokens": int(counts[0])}
        if means.shape[0] > 1:
            result["mtp_loss"] = float(np.mean(means[1:]))
        return result


@dataclasses.dataclass(frozen=True)
class _StandardHooks:
    """The hooks whose outcome goes into the `RunResult` (None: not added to this run)."""

    non_finite: NonFiniteSteps
    checkpoint: Checkpoint
    evaluation: Evaluation | None
    export: ExportParams | None
    plot: PlotCurves | None

    def result(self, end: LoopEnd, workdir: pathlib.Path) -> RunResult:
        """What the run did, once the loop has ended with `end`."""
        evaluation = self.evaluation
        return RunResult(status="done" if end.done else "preempted", step=end.info.step,
                         workdir=workdir, last_checkpoint=self.checkpoint.last_saved,
                         eval_loss=evaluation.final_loss if evaluation else None,
                         first_eval_loss=evaluation.first_loss if evaluation else None,
                         plot=self.plot.path if self.plot else None,
                         export=self.export.path if self.export else None,
                         skipped_steps=self.non_finite.skipped)


def _add_hooks(loop: TrainLoop, setup: RunSetup, program: StepProgram, writer: MetricsWriter,
               progress: Progress, stop_requested: Callable[[], bool]) -> _StandardHooks:
    """The standard hooks in their order: log the step, the non-finite rule, save, preemption,
    evaluate; export and plot at the end."""
    train_cfg, workdir, checkpointer = setup.configs.train, setup.workdir, setup.checkpointer
    runtime = setup.configs.model.runtime
    can_drop = runtime.expert_parallel_when_split and runtime.expert_capacity_factor > 0
    loop.add_hook(MetricsLog(writer, progress, steps=train_cfg.steps,
                             log_every=train_cfg.log_every, record_keys=setup.record_keys,
                             progress_keys=setup.progress_keys + (
                                 ("dropped_copies",) if can_drop else ())))
    non_finite = loop.add_hook(NonFiniteSteps(train_cfg.max_nan_steps, checkpointer,
                                              progress.message))
    checkpoint = loop.add_hook(Checkpoint(checkpointer, setup.meta, last_saved=setup.start or None),
                               every=train_cfg.checkpoint_every)
    # Multi-host: the processes must agree on the step to stop at; JAX's preemption service
    # (started by jax.distributed.initialize) does that.
    loop.add_hook(Preemption(stop_requested, checkpointer.manager.reached_preemption
                             if jax.process_count() > 1 else None))
    evaluation = export = plot = None
    if setup.eval_batches is not None:
        evaluation = loop.add_hook(
            Evaluation(_HeldOutLoss(setup, program), writer, progress.message,
                       at_start=train_cfg.eval_every > 0), every=train_cfg.eval_every)
    if train_cfg.export_params:
        export = loop.add_hook(ExportParams(workdir / EXPORT_DIR, setup.configs.model,
                                            workdir / pipeline.TOKENIZER_FILE), every=0)
    if train_cfg.plot and jax.process_index() == 0:
        plot = loop.add_hook(PlotCurves(workdir), every=0)
    for hook in setup.hooks:
        loop.add_hook(hook)
    return _StandardHooks(non_finite, checkpoint, evaluation, export, plot)


def train(setup: RunSetup, batches: Batches, stop_requested: Callable[[], bool],
          log: Callable[[str], None]) -> RunResult:
    """The part of a run after the data and the checkpoint directory are known to be good:
    the step program, the state (restored, or `setup.initial_state`), and the loop with the
    standard hooks. `batches` must stand after batch `setup.start`."""
    configs, checkpointer, start = setup.configs, setup.checkpointer, setup.start
    data_cfg, train_cfg = configs.data, configs.train
    program = step_program(configs, setup.parallelism, train_cfg.seed,
                           count_zero_grads=setup.count_zero_grads)
    if start:
        state = checkpointer.restore_state(
            start, abstract_with_shardings(program.abstract_state, program.state_shardings))
        log(f"resumed from {checkpointer.directory / str(start)}")
    else:
        state = setup.initial_state(program)
    num_params = sum(x.size for x in jax.tree.leaves(program.params_shape))
    log(f"model: {num_params:,} parameters; batch {data_cfg.batch_size} x {data_cfg.seq_len} "
        f"tokens; {train_cfg.steps} steps on {setup.parallelism.mesh.size} device(s)")
    ramp = BatchRamp.from_config(train_cfg)
    if ramp.steps:
        rows = data_cfg.batch_size // ramp.micro_batches
        log(f"batch ramp: {ramp.start} x {rows} rows at step 0, growing linearly to "
            f"{ramp.micro_batches} x {rows} by step {ramp.steps}")

    is_first = jax.process_index() == 0
    writer = MetricsWriter(setup.workdir, start, train_cfg.tensorboard, is_writer=is_first)
    progress = Progress(train_cfg.progress, start, train_cfg.steps, train_cfg.log_every,
                        enabled=is_first)
    try:
        loop = TrainLoop(program.train_step, steps=train_cfg.steps,
                         learning_rate=learning_rate_schedule(train_cfg),
                         put_batch=lambda batch: program.global_batch(batch, setup.parallelism),
                         say=progress.message)
        hooks = _add_hooks(loop, setup, program, writer, progress, stop_requested)
        end = loop.run(state, batches, start)
    finally:
        progress.close()
        writer.close()
    return hooks.result(end, setup.workdir)


def summary_lines(result: RunResult) -> list[str]:
    """Where everything is, for the end of a run."""
    wd = result.workdir
    lines = [f"{'finished' if result.status == 'done' else 'stopped'} at step {result.step}"]
    if result.first_eval_loss is not None and result.eval_loss is not None:
        lines.append(f"eval loss {result.first_eval_loss:.4f} -> {result.eval_loss:.4f}")
    elif result.eval_loss is not None:
        lines.append(f"eval loss {result.eval_loss:.4f}")
    if result.skipped_steps:
        lines.append(f"skipped {result.skipped_steps} non-finite steps")
    lines += [f"config:      {wd / CONFIG_FILE}",
              f"checkpoints: {wd / 'checkpoints'} (latest step {result.last_checkpoint})",
              f"metrics:     {wd / 'metrics.jsonl'}",
              f"tensorboard: tensorboard --logdir {wd / TENSORBOARD_DIR}"]
    if result.plot is not None:
        lines.append(f"plot:        {result.plot}")
    if result.export is not None:
        lines.append(f"params:      {result.export} (params-only export for inference)")
    return lines
