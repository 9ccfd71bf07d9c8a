"""The pretraining loop: build everything from one config, resume if a checkpoint exists, train.

`run(config, workdir)` is what `python -m mimo_jax.train.pretrain` calls; tests call it too.

Order of one step: dispatch the jitted step (asynchronous), read the next batch from Grain while
the device computes, then fetch the step's metrics. The Grain iterator state is captured right
after each batch is read, so a checkpoint at step N stores exactly "N batches consumed".

Stops:
  done       `train.steps` reached: final eval, final checkpoint, params export, plot.
  preempted  `stop_requested()` turned true (SIGTERM): checkpoint at the current step, return.
  errors     bad data mid-run: checkpoint at the last finished step, then the `DataError`;
             `max_nan_steps` non-finite steps in a row: `TrainingStopped`, no new checkpoint
             (the last good one stays the latest).
"""

from __future__ import annotations

import collections
import dataclasses
import math
import pathlib
import time
from typing import Any, Callable

import jax
import ml_collections
import numpy as np
import optax

from mimo_jax.config import ConfigError, ModelConfig, model_config_from_dict, replace_model
from mimo_jax.data import pipeline
from mimo_jax.data.config import DataConfig, data_config_from_dict
from mimo_jax.data.errors import DataError
from mimo_jax.model.transformer import MiMoV2Flash
from mimo_jax.parallel import MeshConfig, Parallelism, mesh_config_from_dict
from mimo_jax.train import partition
from mimo_jax.train.checkpoint import (EXPORT_DIR, CheckpointError, Checkpointer, architecture,
                                       export_params)
from mimo_jax.train.config import TrainConfig, train_config_from_dict
from mimo_jax.train.metrics import TENSORBOARD_DIR, MetricsWriter, Progress
from mimo_jax.train.optimizer import learning_rate_schedule, make_optimizer
from mimo_jax.train.state import TrainState, init_state
from mimo_jax.train.step import make_eval_step, make_train_step

CONFIG_FILE = "config.json"


class TrainingStopped(RuntimeError):
    """The run cannot go on (e.g. too many non-finite steps); the message says what was kept."""


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
    train = train_config_from_dict(config.train)
    if train.compute_dtype:
        model = replace_model(model, dtype=train.compute_dtype)
    return RunConfigs(model=model, data=data_config_from_dict(config.data), train=train,
                      mesh=mesh_config_from_dict(config.get("mesh")))


def _save_config(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> None:
    path = workdir / CONFIG_FILE
    tmp = path.with_name(CONFIG_FILE + ".tmp")
    tmp.write_text(config.to_json_best_effort(indent=2, sort_keys=True))
    tmp.replace(path)


class _Batches:
    """The training iterator, remembering its state after the last batch handed out."""

    def __init__(self, dataset, data_state: Any | None):
        self._iterator = iter(dataset)
        if data_state is not None:
            self._iterator.set_state(data_state)
        self.state_after_last = self._iterator.get_state()

    def next(self) -> dict[str, np.ndarray]:
        batch = next(self._iterator)
        self.state_after_last = self._iterator.get_state()
        return batch

    def close(self) -> None:
        close = getattr(self._iterator, "close", None)
        if close is not None:
            close()


def _data_stream(config: DataConfig, shard: pipeline.ProcessShard) -> dict[str, Any]:
    """The data settings a saved iterator position depends on (JSON-ready)."""
    keys = ("seq_len", "batch_size", "shuffle", "seed", "num_workers", "max_document_bytes",
            "text_document", "jsonl_field", "add_eos", "seqio_split", "seqio_feature")
    stream = {k: getattr(config, k) for k in keys}
    stream["train_sources"] = ",".join(str(s) for s in config.train_sources)
    stream["process_count"] = shard.count
    return stream


def _abstract_with_shardings(abstract: Any, shardings: Any) -> Any:
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
        return jax.jit(lambda: init_state(self.model, self.optimizer, seed),
                       out_shardings=self.state_shardings)()

    def global_batch(self, local_batch: dict[str, np.ndarray],
                     parallelism: Parallelism) -> dict[str, jax.Array]:
        """Per-process numpy rows -> one global jax.Array per key."""
        return parallelism.put_batch(local_batch,
                                     {k: self.batch_sharding for k in local_batch})


def step_program(configs: RunConfigs, parallelism: Parallelism, seed: int) -> StepProgram:
    """Traces the model's parameters once and builds the train step under the mesh and rules."""
    model = MiMoV2Flash(configs.model)
    params_shape, param_shardings = parallelism.param_shardings(model)
    optimizer = make_optimizer(configs.train, params_shape)
    abstract_state = jax.eval_shape(lambda: init_state(model, optimizer, seed))
    state_shardings = parallelism.state_shardings(abstract_state, params_shape, param_shardings)
    batch_sharding = partition.batch_sharding(parallelism)
    # Traced under the mesh and the logical rules (the model's sharding constraints,
    # expert-parallel dispatch and context-parallel attention), with explicit shardings.
    train_step = parallelism.jit_train_step(
        make_train_step(model, configs.model, configs.train, optimizer), state_shardings,
        batch_sharding, extra_args=1)
    return StepProgram(model, params_shape, optimizer, abstract_state, state_shardings,
                       batch_sharding, train_step)


def run(config: ml_collections.ConfigDict, workdir: str | pathlib.Path, *,
        stop_requested: Callable[[], bool] = lambda: False,
        log: Callable[[str], None] = print) -> RunResult:
    """Trains (or resumes training) as `config` says, in `workdir`."""
    configs = build_configs(config)
    model_cfg, data_cfg, train_cfg = configs.model, configs.data, configs.train
    workdir = pathlib.Path(workdir).absolute()
    is_first = jax.process_index() == 0
    if is_first:
        workdir.mkdir(parents=True, exist_ok=True)
        _save_config(config, workdir)

    parallelism = partition.make_parallelism(configs.mesh, train_cfg.num_devices)
    partition.check_batch(data_cfg.batch_size, data_cfg.seq_len, train_cfg.grad_accum_steps,
                          parallelism)
    shard = pipeline.ProcessShard.from_jax()

    # Data first: a bad path fails in seconds, before any compilation.
    train_sources = pipeline.open_sources(data_cfg, "train")
    eval_sources = pipeline.open_sources(data_cfg, "eval") if data_cfg.eval_batches else []
    tokenizer = pipeline.resolve_tokenizer(data_cfg, model_cfg.vocab_size, workdir,
                                           train_sources, save=is_first)
    log("data:\n" + pipeline.describe_sources(train_sources))
    if tokenizer is not None:
        log(f"tokenizer: {tokenizer.source} ({tokenizer.vocab_size} ids)")

    checkpointer = Checkpointer(workdir, train_cfg)
    meta = {"architecture": architecture(model_cfg),
            "tokenizer": tokenizer.fingerprint() if tokenizer is not None else None,
            "data_stream": _data_stream(data_cfg, shard)}
    batches = None
    try:  # the checkpointer's background threads are stopped however the run ends
        start = checkpointer.latest_step() or 0
        data_state = None
        if start:
            checkpointer.check(start, meta)
            data_state = checkpointer.restore_data_state(start)
        try:
            batches = _Batches(pipeline.train_batches(data_cfg, train_sources, tokenizer,
                                                      model_cfg.vocab_size, shard), data_state)
        except (KeyError, IndexError, TypeError, ValueError) as err:
            if isinstance(err, DataError) or data_state is None:
                raise
            raise CheckpointError(f"the data position saved in checkpoint "
                                  f"{checkpointer.directory / str(start)} does not fit this data "
                                  f"pipeline: {type(err).__name__}: {err}") from err
        # The first batch before any compilation: bad data fails in seconds.
        batch = batches.next() if start < train_cfg.steps else None
        setup = _Setup(configs, workdir, parallelism, shard, tokenizer, eval_sources,
                       checkpointer, meta, start, batches)
        return _train(setup, batch, stop_requested, log)
    finally:
        if batches is not None:
            batches.close()
        checkpointer.close()


@dataclasses.dataclass(frozen=True)
class _Setup:
    """What `run` checked before any compilation."""

    configs: RunConfigs
    workdir: pathlib.Path
    parallelism: Parallelism
    shard: pipeline.ProcessShard
    tokenizer: Any
    eval_sources: list
    checkpointer: Checkpointer
    meta: dict
    start: int  # the step restored from (0 for a fresh run)
    batches: _Batches


def _train(setup: _Setup, batch: dict[str, np.ndarray] | None,
           stop_requested: Callable[[], bool], log: Callable[[str], None]) -> RunResult:
    """The part of `run` after the data and the checkpoint directory are known to be good."""
    configs, workdir, shard = setup.configs, setup.workdir, setup.shard
    parallelism = setup.parallelism
    mesh = parallelism.mesh
    tokenizer, eval_sources, checkpointer = setup.tokenizer, setup.eval_sources, setup.checkpointer
    meta, start, batches = setup.meta, setup.start, setup.batches
    model_cfg, data_cfg, train_cfg = configs.model, configs.data, configs.train
    is_first = jax.process_index() == 0
    program = step_program(configs, parallelism, train_cfg.seed)
    schedule = learning_rate_schedule(train_cfg)
    if start:
        state = checkpointer.restore_state(
            start, _abstract_with_shardings(program.abstract_state, program.state_shardings))
        log(f"resumed from {checkpointer.directory / str(start)}")
    else:
        state = program.initial_state(train_cfg.seed)
    num_params = sum(x.size for x in jax.tree.leaves(program.params_shape))
    log(f"model: {num_params:,} parameters; batch {data_cfg.batch_size} x {data_cfg.seq_len} "
        f"tokens; {train_cfg.steps} steps on {mesh.size} device(s)")
    train_step = program.train_step
    eval_step = parallelism.jit_eval_step(make_eval_step(program.model, model_cfg),
                                          program.state_shardings.params, program.batch_sharding)
    eval_cache: list[dict[str, np.ndarray]] = []

    def evaluate(params) -> dict[str, float] | None:
        if not eval_sources:
            return None
        if not eval_cache:
            eval_cache.extend(pipeline.eval_batches(data_cfg, eval_sources, tokenizer,
                                                    model_cfg.vocab_size, shard))
        sums = counts = 0.0
        for eval_batch in eval_cache:
            out = eval_step(params, program.global_batch(eval_batch, parallelism))
            sums, counts = sums + out["sums"], counts + out["counts"]
        sums, counts = np.asarray(sums, np.float64), np.asarray(counts, np.float64)
        means = sums / np.maximum(counts, 1.0)
        result = {"loss": float(means[0]), "perplexity": float(math.exp(min(means[0], 50.0))),
                  "tokens": int(counts[0])}
        if means.shape[0] > 1:
            result["mtp_loss"] = float(np.mean(means[1:]))
        return result

    writer = MetricsWriter(workdir, start, train_cfg.tensorboard, is_writer=is_first)
    progress = Progress(train_cfg.progress, start, train_cfg.steps, train_cfg.log_every,
                        enabled=is_first)
    last_saved = start or None
    result = RunResult(status="done", step=start, workdir=workdir, last_checkpoint=last_saved)

    def save(step: int, data_state_now: Any, current: TrainState) -> None:
        nonlocal last_saved
        if last_saved == step:
            return
        checkpointer.save(step, current, data_state_now, meta)
        last_saved = result.last_checkpoint = step

    try:
        if start == 0 and train_cfg.eval_every:
            first = evaluate(state.params)
            if first is not None:
                writer.write(0, "eval", first)
                result.first_eval_loss = first["loss"]
                progress.message(f"step 0: eval loss {first['loss']:.4f}")
        step = start
        consecutive_bad = 0
        # tokens/s over the last `log_every` steps, timing only training: each interval runs from
        # the end of the previous step's bookkeeping (evals and saves excluded) to the metrics.
        window: collections.deque = collections.deque(maxlen=train_cfg.log_every)
        interval_start = time.perf_counter()
        while step < train_cfg.steps:
            state, metrics = train_step(state, program.global_batch(batch, parallelism),
                                        np.float32(schedule(step)))
            data_state_now = batches.state_after_last
            step += 1
            try:
                batch = batches.next() if step < train_cfg.steps else None
            except Exception as err:  # a data error mid-run: keep what was trained, then stop
                jax.block_until_ready(state)
                save(step, data_state_now, state)
                checkpointer.wait()
                raise DataError(f"reading training batch {step + 1} failed ({err}); "
                                f"checkpoint saved at step {step}") from err
            values = jax.device_get(metrics)
            if step > start + 1:  # the first step's interval is mostly compilation
                window.append((int(values["tokens"]), time.perf_counter() - interval_start))
            speed = (sum(t for t, _ in window) / max(sum(s for _, s in window), 1e-9)
                     if window else None)
            finite = bool(values["finite"])
            consecutive_bad = 0 if finite else consecutive_bad + 1
            result.skipped_steps += not finite
            record = {k: values[k] for k in ("loss", "ce", "mtp", "balance", "grad_norm",
                                             "learning_rate", "max_load_violation")}
            record.update(tokens_per_sec=speed, skipped=not finite)
            if step % train_cfg.log_every == 0 or step == train_cfg.steps or not finite:
                writer.write(step, "train", record)
            progress.update(step, float(values["loss"]), float(values["ce"]), speed)
            result.step = step
            if not finite:
                progress.message(f"step {step}: non-finite loss {float(values['loss'])} or "
                                 f"gradient norm {float(values['grad_norm'])}; update skipped "
                                 f"({consecutive_bad} in a row)")
                if consecutive_bad >= train_cfg.max_nan_steps:
                    checkpointer.wait()
                    kept = checkpointer.latest_step()
                    raise TrainingStopped(
                        f"{consecutive_bad} non-finite steps in a row (up to step {step}); "
                        f"stopped without saving. Last good checkpoint: "
                        f"{'none' if kept is None else checkpointer.directory / str(kept)}")
            # No periodic save inside a run of skipped steps: the newest checkpoint stays the
            # last one written after a finite step.
            if consecutive_bad == 0 and (step % train_cfg.checkpoint_every == 0
                                         or step == train_cfg.steps):
                save(step, data_state_now, state)
            # Multi-host: the processes must agree on the step to save at; JAX's preemption
            # service (started by jax.distributed.initialize) does that.
            if stop_requested() or (jax.process_count() > 1
                                    and checkpointer.manager.reached_preemption(step)):
                save(step, data_state_now, state)
                checkpointer.wait()
                progress.message(f"stop requested: checkpoint saved at step {step}")
                result.status = "preempted"
                return result
            if train_cfg.eval_every and step % train_cfg.eval_every == 0 and (
                    step != train_cfg.steps):
                evaluated = evaluate(state.params)
                if evaluated is not None:
                    writer.write(step, "eval", evaluated)
                    progress.message(f"step {step}: eval loss {evaluated['loss']:.4f} "
                                     f"perplexity {evaluated['perplexity']:.2f}")
            interval_start = time.perf_counter()
        final = evaluate(state.params)
        if final is not None:
            writer.write(step, "eval", final)
            result.eval_loss = final["loss"]
            progress.message(f"step {step}: eval loss {final['loss']:.4f} "
                             f"perplexity {final['perplexity']:.2f}")
        # No batch was read ahead after the last step, so this is "`step` batches consumed".
        save(step, batches.state_after_last, state)
        checkpointer.wait()
        if train_cfg.export_params:
            result.export = export_params(workdir / EXPORT_DIR, state.params, model_cfg,
                                          workdir / pipeline.TOKENIZER_FILE)
    finally:
        progress.close()
        writer.close()
    if train_cfg.plot and is_first:
        from mimo_jax.train.curves import plot_metrics  # pylint: disable=import-outside-toplevel
        try:
            result.plot = plot_metrics(workdir)
        except FileNotFoundError:
            result.plot = None
    return result


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

