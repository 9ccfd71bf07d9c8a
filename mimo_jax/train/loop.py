"""The one training loop: a jitted step over a batch iterator, with hooks at given intervals.

    loop = TrainLoop(train_step, steps=1000, learning_rate=schedule)
    loop.add_hook(MetricsLog(...))                   # after every step
    loop.add_hook(Checkpoint(...), every=100)        # after steps 100, 200, ...
    end = loop.run(state, Batches(iterator, saved_position), start=restored_step)

`train_step(state, batch, learning_rate) -> (state, metrics)` is any (jitted) step: pretraining,
SFT and on-policy distillation differ in their step, data and hooks, not in this loop. A step
that can skip its update reports `metrics["finite"]` (False: skipped), which `StepInfo.finite`
reads for the hooks.

Order of one step: dispatch the step (asynchronous), read the next batch while the device
computes, fetch the step's metrics to the host, then call the hooks due at this step in the
order they were added. The iterator's state is taken right after each batch is read, so the
`data_state` a hook sees at step N is exactly "N batches consumed".

Ends:
  done       `steps` reached (or `start >= steps`): every hook's `on_end`, status done.
  stopped    a hook raised `StopLoop` (e.g. a preemption notice): the rest of that step's hooks
             are skipped, every hook's `on_stop` runs, the loop says what they did.
  bad data   reading a batch failed after step N: every hook's `on_stop` at step N, then
             `DataError` naming the batch and what the hooks did (e.g. "checkpoint saved").
  anything else a hook raises (e.g. `TrainingStopped` from the non-finite rule) ends the loop
  as it is, with no `on_stop`.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Iterator, Mapping, TypeVar, overload

import jax
import numpy as np

from mimo_jax.data.errors import DataError


class StopLoop(Exception):
    """Raised by a hook's `on_step` to end the run after this step; the message says why."""


class TrainingStopped(RuntimeError):
    """The run cannot go on (e.g. too many non-finite steps); the message says what was kept."""


@dataclasses.dataclass(frozen=True)
class StepInfo:
    """What hooks see after a step (or at the start, where `metrics` and `seconds` are None).

    step:       steps done; `state` holds the result of this many updates.
    state:      the train state after the step (device arrays).
    metrics:    the step's metrics as host (numpy) values.
    data_state: the batch iterator's state after this step's batch ("`step` batches consumed").
    seconds:    wall time from the end of the previous step's hooks to this step's metrics on
                the host: the step and the next batch's read, never an eval or a save.
    """

    step: int
    state: Any
    metrics: Mapping[str, Any] | None
    data_state: Any
    seconds: float | None

    @property
    def finite(self) -> bool:
        """False when the step reported `finite=False`: its update was skipped."""
        return self.metrics is None or bool(self.metrics.get("finite", True))


class Hook:
    """One job done beside the steps. A subclass overrides the events it needs."""

    def on_start(self, info: StepInfo) -> None:
        """Before the first step; `info.step` is the start step."""

    def on_step(self, info: StepInfo) -> None:
        """After each step that the hook's `every` divides; may raise `StopLoop`."""

    def on_stop(self, info: StepInfo) -> str | None:
        """The loop ends early after `info.step`; returns what the hook did, for the message."""

    def on_end(self, info: StepInfo) -> None:
        """The loop reached its last step (`info` is that step's)."""


HookT = TypeVar("HookT", bound=Hook)


class _FunctionHook(Hook):
    """A plain `fn(info)` called at the steps `add_hook` was given."""

    def __init__(self, fn: Callable[[StepInfo], None]):
        self._fn = fn

    def on_step(self, info: StepInfo) -> None:
        self._fn(info)


class Batches:
    """A batch iterator with `get_state`/`set_state`, remembering its state after the last batch
    handed out (what a checkpoint stores).

    `state`: where to continue, e.g. a checkpoint's saved position (None: the beginning).
    """

    def __init__(self, iterator: Iterator, state: Any | None = None):
        self._iterator = iterator
        if state is not None:
            iterator.set_state(state)
        self.state = iterator.get_state()
        self._ahead: tuple[Any, Any] | None = None  # (batch, the state after it)

    def read_ahead(self) -> None:
        """Reads the next batch now (e.g. to fail on bad data before compiling); the next
        `next()` hands it out."""
        if self._ahead is None:
            batch = next(self._iterator)
            self._ahead = (batch, self._iterator.get_state())

    def __iter__(self) -> "Batches":
        return self

    def __next__(self) -> Any:
        self.read_ahead()
        (batch, self.state), self._ahead = self._ahead, None
        return batch

    def close(self) -> None:
        """Stops the iterator's workers, if it has any."""
        close = getattr(self._iterator, "close", None)
        if close is not None:
            close()


@dataclasses.dataclass(frozen=True)
class LoopEnd:
    """How `TrainLoop.run` ended: `info` is the last step's; `stopped_by` the hook's `StopLoop`
    (None when the loop reached its last step)."""

    info: StepInfo
    stopped_by: StopLoop | None = None

    @property
    def done(self) -> bool:
        """True when the loop reached its last step."""
        return self.stopped_by is None


class TrainLoop:
    """Runs `train_step` from a start step to `steps`, calling hooks at their intervals.

    learning_rate: step -> the rate for the update that follows `step` steps (a host float,
                   passed to the step as a float32 scalar so the schedule never recompiles it).
    put_batch:     a batch from the iterator -> what the step takes (e.g. global jax.Arrays).
    say:           where the loop reports an early stop (e.g. a progress bar's `message`).
    """

    def __init__(self, train_step: Callable[[Any, Any, np.float32], tuple[Any, Any]], *,
                 steps: int, learning_rate: Callable[[int], float],
                 put_batch: Callable[[Any], Any] = lambda batch: batch,
                 say: Callable[[str], None] = print):
        if not isinstance(steps, int) or steps < 0:
            raise ValueError(f"steps = {steps!r}: must be an int >= 0")
        self._train_step = train_step
        self._steps = steps
        self._learning_rate = learning_rate
        self._put_batch = put_batch
        self._say = say
        self._hooks: list[tuple[Hook, int]] = []

    @overload
    def add_hook(self, hook: HookT, every: int = 1) -> HookT: ...

    @overload
    def add_hook(self, hook: Callable[[StepInfo], None], every: int = 1) -> Hook: ...

    def add_hook(self, hook, every=1):
        """Calls `hook` after every `every`-th step (0: never after a step, only its start, stop
        and end events); a plain function becomes a hook's `on_step`. Hooks run in the order
        added. Returns the hook."""
        if not isinstance(every, int) or every < 0:
            raise ValueError(f"hook every = {every!r}: must be an int >= 0")
        if not isinstance(hook, Hook):
            if not callable(hook):
                raise TypeError(f"hook {hook!r} is neither a Hook nor a function of StepInfo")
            hook = _FunctionHook(hook)
        self._hooks.append((hook, every))
        return hook

    def run(self, state: Any, batches: Batches, start: int = 0) -> LoopEnd:
        """Trains from `state` (the result of `start` steps) to `steps`; `batches` must stand
        at batch `start + 1`."""
        info = StepInfo(start, state, None, batches.state, None)
        for hook, _ in self._hooks:
            hook.on_start(info)
        batch = next(batches) if start < self._steps else None
        interval_start = time.perf_counter()
        for step in range(start + 1, self._steps + 1):
            state, metrics = self._train_step(state, self._put_batch(batch),
                                              np.float32(self._learning_rate(step - 1)))
            data_state = batches.state
            try:  # the next batch, read while the device computes
                batch = next(batches) if step < self._steps else None
            except Exception as err:  # bad data mid-run: the hooks keep what was trained
                jax.block_until_ready(state)
                done = self._stop(StepInfo(step, state, None, data_state, None))
                raise DataError(f"reading training batch {step + 1} failed ({err})"
                                + (f"; {done}" if done else "")) from err
            metrics = jax.device_get(metrics)
            info = StepInfo(step, state, metrics, data_state,
                            time.perf_counter() - interval_start)
            try:
                for hook, every in self._hooks:
                    if every and step % every == 0:
                        hook.on_step(info)
            except StopLoop as stop:
                done = self._stop(info)
                self._say(f"{stop}: {done}" if done else str(stop))
                return LoopEnd(info, stopped_by=stop)
            interval_start = time.perf_counter()
        for hook, _ in self._hooks:
            hook.on_end(info)
        return LoopEnd(info)

    def _stop(self, info: StepInfo) -> str:
        """Every hook's `on_stop`, in order; what they did, joined."""
        notes = [hook.on_stop(info) for hook, _ in self._hooks]
        return "; ".join(note for note in notes if note)
