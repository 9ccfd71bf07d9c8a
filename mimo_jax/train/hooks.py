"""The standard hooks of a training run, one job each (see `loop.TrainLoop.add_hook`).

Added in this order, each step's work reads: log the step, apply the non-finite rule, save,
check for preemption, evaluate. A preempted step therefore has its metrics and its checkpoint
but skips its evaluation (the job may have seconds left).

  MetricsLog      the metrics record and the progress line, with tokens/s over a window
  NonFiniteSteps  counts skipped (non-finite) steps; too many in a row stop the run
  Checkpoint      saves every N steps (never inside a run of skipped steps), at the end, on stop
  Preemption      ends the loop when a stop is requested (SIGTERM, JAX's preemption service)
  Evaluation      the held-out loss every N steps, at the end, and at step 0 of a fresh run
  ExportParams    a params-only copy for inference at the end
  PlotCurves      the loss curves to PNG at the end
"""

from __future__ import annotations

import collections
import pathlib
from typing import Any, Callable, Sequence

from mimo_jax.config import ModelConfig
from mimo_jax.train.checkpoint import Checkpointer, export_params
from mimo_jax.train.loop import Hook, StepInfo, StopLoop, TrainingStopped
from mimo_jax.train.metrics import MetricsWriter, Progress
from mimo_jax.train.curves import plot_metrics

class Throughput:
    """Tokens per second over the last `window` (tokens, seconds) intervals."""

    def __init__(self, window: int):
        self._intervals: collections.deque = collections.deque(maxlen=window)

    def add(self, tokens: int, seconds: float) -> None:
        """One interval: `tokens` trained in `seconds`."""
        self._intervals.append((tokens, seconds))

    @property
    def tokens_per_sec(self) -> float | None:
        """None until an interval was added."""
        if not self._intervals:
            return None
        seconds = sum(s for _, s in self._intervals)
        return sum(t for t, _ in self._intervals) / max(seconds, 1e-9)


class MetricsLog(Hook):
    """Writes the train record of every `log_every`-th step, the last step and every non-finite
    step, and updates the progress line after every step (add with every=1).

    Tokens/s covers the last `log_every` steps and only training time (`StepInfo.seconds`); the
    first step after the start is left out, its time being mostly compilation. The step's
    metrics must hold `tokens`, `loss`, `ce`, `record_keys` and `progress_keys` (shown on the
    progress line after the loss).
    """

    def __init__(self, writer: MetricsWriter, progress: Progress, *, steps: int, log_every: int,
                 record_keys: Sequence[str], progress_keys: Sequence[str] = ()):
        self._writer = writer
        self._progress = progress
        self._steps = steps
        self._log_every = log_every
        self._record_keys = tuple(record_keys)
        self._progress_keys = tuple(progress_keys)
        self._throughput = Throughput(log_every)
        self._start = 0

    def on_start(self, info: StepInfo) -> None:
        self._start = info.step

    def on_step(self, info: StepInfo) -> None:
        values = info.metrics
        if info.step > self._start + 1:
            self._throughput.add(int(values["tokens"]), info.seconds)
        speed = self._throughput.tokens_per_sec
        record = {k: values[k] for k in self._record_keys}
        record.update(tokens_per_sec=speed, skipped=not info.finite)
        if info.step % self._log_every == 0 or info.step == self._steps or not info.finite:
            self._writer.write(info.step, "train", record)
        self._progress.update(info.step, float(values["loss"]), float(values["ce"]), speed,
                              {k: float(values[k]) for k in self._progress_keys})


class NonFiniteSteps(Hook):
    """Counts the steps whose update was skipped (non-finite loss or gradient norm) and raises
    `TrainingStopped`, without saving, at `max_in_a_row` in a row (add with every=1).

    The step's metrics must hold `loss` and `grad_norm`."""

    def __init__(self, max_in_a_row: int, checkpointer: Checkpointer,
                 say: Callable[[str], None]):
        self._max_in_a_row = max_in_a_row
        self._checkpointer = checkpointer
        self._say = say
        self.in_a_row = 0
        self.skipped = 0

    def on_step(self, info: StepInfo) -> None:
        if info.finite:
            self.in_a_row = 0
            return
        self.in_a_row += 1
        self.skipped += 1
        self._say(f"step {info.step}: non-finite loss {float(info.metrics['loss'])} or gradient "
                  f"norm {float(info.metrics['grad_norm'])}; update skipped "
                  f"({self.in_a_row} in a row)")
        if self.in_a_row >= self._max_in_a_row:
            self._checkpointer.wait()
            kept = self._checkpointer.latest_step()
            raise TrainingStopped(
                f"{self.in_a_row} non-finite steps in a row (up to step {info.step}); stopped "
                f"without saving. Last good checkpoint: "
                f"{'none' if kept is None else self._checkpointer.directory / str(kept)}")


class Checkpoint(Hook):
    """Saves the state and the data position at the steps it is added for, at the end, and when
    the loop stops early (preemption, bad data).

    A periodic save is skipped after a non-finite step, so the newest checkpoint stays one
    written after a finite step; the end and stop saves are unconditional. A step is saved once.
    `last_saved`: the step already on disk (the step resumed from), if any.
    """

    def __init__(self, checkpointer: Checkpointer, meta: dict[str, Any],
                 last_saved: int | None = None):
        self._checkpointer = checkpointer
        self._meta = meta
        self.last_saved = last_saved

    def save(self, info: StepInfo) -> None:
        """Starts saving `info`'s state and data position unless that step is saved already."""
        if self.last_saved == info.step:
            return
        self._checkpointer.save(info.step, info.state, info.data_state, self._meta)
        self.last_saved = info.step

    def on_step(self, info: StepInfo) -> None:
        if info.finite:
            self.save(info)

    def on_stop(self, info: StepInfo) -> str:
        self.save(info)
        self._checkpointer.wait()
        return f"checkpoint saved at step {info.step}"

    def on_end(self, info: StepInfo) -> None:
        self.save(info)
        self._checkpointer.wait()


class Preemption(Hook):
    """Ends the loop with `StopLoop` once `stop_requested()` is true (SIGTERM in this process) or,
    in a multi-host run, `reached_preemption(step)` is (JAX's preemption service, through
    Orbax: every process stops at the same step). Add with every=1, after `Checkpoint`."""

    def __init__(self, stop_requested: Callable[[], bool],
                 reached_preemption: Callable[[int], bool] | None = None):
        self._stop_requested = stop_requested
        self._reached_preemption = reached_preemption

    def on_step(self, info: StepInfo) -> None:
        if self._stop_requested() or (self._reached_preemption is not None
                                      and self._reached_preemption(info.step)):
            raise StopLoop("stop requested")


def _loss_and_perplexity(result: dict[str, Any]) -> str:
    return f"eval loss {result['loss']:.4f} perplexity {result['perplexity']:.2f}"


class Evaluation(Hook):
    """The held-out loss at the steps it is added for and at the end (once per step), and with
    `at_start` also of a fresh run's initial parameters (step 0).

    `evaluate(params)` returns at least {"loss"}; each result becomes an "eval" record and a
    progress message, `describe(result)` (default: the loss and perplexity; at step 0 the loss).
    """

    def __init__(self, evaluate: Callable[[Any], dict[str, Any]], writer: MetricsWriter,
                 say: Callable[[str], None], *, at_start: bool,
                 describe: Callable[[dict[str, Any]], str] | None = None):
        self._evaluate = evaluate
        self._describe = describe or _loss_and_perplexity
        self._describe_start = describe or (lambda result: f"eval loss {result['loss']:.4f}")
        self._writer = writer
        self._say = say
        self._at_start = at_start
        self._latest: tuple[int, dict[str, Any]] | None = None
        self.first_loss: float | None = None  # at step 0
        self.final_loss: float | None = None  # at the end

    def _run(self, info: StepInfo) -> dict[str, Any]:
        if self._latest is None or self._latest[0] != info.step:
            result = self._evaluate(info.state.params)
            self._writer.write(info.step, "eval", result)
            self._say(f"step {info.step}: {self._describe(result)}")
            self._latest = (info.step, result)
        return self._latest[1]

    def on_start(self, info: StepInfo) -> None:
        if self._at_start and info.step == 0:
            result = self._evaluate(info.state.params)
            self._writer.write(0, "eval", result)
            self._say(f"step 0: {self._describe_start(result)}")
            self._latest = (0, result)
            self.first_loss = result["loss"]

    def on_step(self, info: StepInfo) -> None:
        self._run(info)

    def on_end(self, info: StepInfo) -> None:
        self.final_loss = self._run(info)["loss"]


class ExportParams(Hook):
    """At the end, a params-only copy for inference in `directory` (see `export_params`)."""

    def __init__(self, directory: pathlib.Path, model_config: ModelConfig,
                 tokenizer_file: pathlib.Path | None = None):
        self._directory = directory
        self._model_config = model_config
        self._tokenizer_file = tokenizer_file
        self.path: pathlib.Path | None = None

    def on_end(self, info: StepInfo) -> None:
        self.path = export_params(self._directory, info.state.params, self._model_config,
                                  self._tokenizer_file)


class PlotCurves(Hook):
    """At the end, the run's loss curves as `<workdir>/loss.png` (none without a metrics log)."""

    def __init__(self, workdir: pathlib.Path):
        self._workdir = workdir
        self.path: pathlib.Path | None = None

    def on_end(self, info: StepInfo) -> None:
        try:
            self.path = plot_metrics(self._workdir)
        except FileNotFoundError:
            self.path = None
