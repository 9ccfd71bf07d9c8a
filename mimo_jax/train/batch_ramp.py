"""The batch-size ramp: the report's batch "warms up linearly to 2,048 over the initial 500B
tokens" (section 3.2).

The batch grows by whole micro-batches. A ramped run reads its data as a stream of micro-batches
(B / A rows each, A = `train.grad_accum_steps`) and gives step s a full [B, T] batch in which
only `micro_batches_at(s)` micro-batches hold data; the others are padding, which the train step
skips (`step.make_train_step` runs no forward or backward on an all-padding micro-batch), so a
ramp step costs what its real rows cost and one compiled step serves every batch size.

    ramp = BatchRamp.from_config(train_config)      # steps 0..R-1 grow from `start` to A
    ramp.micro_batches_at(step)                     # micro-batches with data at this step
    ramp.rows_before(step, rows_per_micro_batch)    # rows trained in steps [0, step)

Rows are placed as the step splits them (`step._micro_batches`: micro-batch a holds rows a,
a + A, ...), so each data-parallel device holds an equal share of every micro-batch with data.
The iterator's state is the micro-batch stream's state and the step it stands at: a resumed run
continues the ramp exactly.
Legend: B rows per process and step, A micro-batches, m = B / A, T length.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterator

import numpy as np

from mimo_jax.config_reader import fail
from mimo_jax.train.config import TrainConfig


@dataclasses.dataclass(frozen=True)
class BatchRamp:
    """steps: ramp length R (0: no ramp). start: micro-batches with data at step 0.
    micro_batches: A, the final batch's micro-batches (`train.grad_accum_steps`)."""

    steps: int
    start: int
    micro_batches: int

    @classmethod
    def from_config(cls, config: TrainConfig) -> "BatchRamp":
        return cls(config.batch_ramp_steps, config.batch_ramp_start, config.grad_accum_steps)

    def micro_batches_at(self, step: int) -> int:
        """Micro-batches with data at `step` (0-based): `start` at step 0, growing linearly in
        equal plateaus to A, reached by step R - 1 at the latest; A from step R on."""
        if step >= self.steps:
            return self.micro_batches
        levels = self.micro_batches - self.start + 1
        return min(self.start + levels * step // self.steps, self.micro_batches)

    def rows_before(self, step: int, rows_per_micro_batch: int) -> int:
        """Rows (all processes' when `rows_per_micro_batch` is global) trained in [0, step)."""
        ramped = min(step, self.steps)
        total = sum(self.micro_batches_at(s) for s in range(ramped))
        return (total + (step - ramped) * self.micro_batches) * rows_per_micro_batch


def refuse(config: TrainConfig, trainer: str) -> None:
    """Raises `ConfigError` when a trainer without a batch ramp (post-training) is given one."""
    if config.batch_ramp_steps:
        fail("train.batch_ramp_steps", config.batch_ramp_steps,
             f"the batch ramp is a pretraining option; {trainer} trains every step on its whole "
             "batch (set it to 0)")


def steps_for_rows(rows: float, ramp: BatchRamp, rows_per_micro_batch: int) -> int:
    """The fewest steps whose rows (`BatchRamp.rows_before`) reach `rows`: how a schedule given
    in tokens (warm-up over 50B tokens, ...) becomes steps under the ramp."""
    step, done = 0, 0
    while step < ramp.steps and done < rows:
        done += ramp.micro_batches_at(step) * rows_per_micro_batch
        step += 1
    if done >= rows:
        return step
    full = ramp.micro_batches * rows_per_micro_batch
    return step + -(-int(rows - done) // full)


def ramp_steps_for_rows(rows: float, start: int, micro_batches: int,
                        rows_per_micro_batch: int) -> int:
    """The shortest ramp from `start` to `micro_batches` micro-batches that trains `rows` rows
    before it ends (the report's "over the initial 500B tokens")."""
    low, high = 1, 1
    while BatchRamp(high, start, micro_batches).rows_before(high, rows_per_micro_batch) < rows:
        low, high = high, high * 2
    while low < high:  # rows_before(R) of a ramp of length R grows with R
        mid = (low + high) // 2
        if BatchRamp(mid, start, micro_batches).rows_before(mid, rows_per_micro_batch) < rows:
            low = mid + 1
        else:
            high = mid
    return low


class RampedBatches(Iterator[dict[str, np.ndarray]]):
    """Per-step [B, T] batches from an iterator of [m, T] micro-batches (`micro_batches` of
    them make B), `ramp.micro_batches_at(step)` of them with data and the rest padding."""

    def __init__(self, micro_batch_iterator: Any, ramp: BatchRamp, pad_id: int):
        self._iterator = micro_batch_iterator
        self._ramp = ramp
        self._pad_id = pad_id
        self._step = 0

    def __next__(self) -> dict[str, np.ndarray]:
        count = self._ramp.micro_batches_at(self._step)
        micro = [next(self._iterator) for _ in range(count)]
        accum = self._ramp.micro_batches
        batch = {}
        for key, first in micro[0].items():
            rows, *rest = first.shape
            # [m, A, ...] viewed as [B, ...] puts micro-batch a at rows a, a + A, ...
            out = np.zeros((rows, accum, *rest), first.dtype)
            if key == "tokens":
                out[:] = self._pad_id
            for a, part in enumerate(micro):
                out[:, a] = part[key]
            batch[key] = out.reshape(rows * accum, *rest)
        self._step += 1
        return batch

    def get_state(self) -> dict[str, Any]:
        return {"micro_batches": self._iterator.get_state(), "step": self._step}

    def set_state(self, state: dict[str, Any]) -> None:
        self._iterator.set_state(state["micro_batches"])
        self._step = int(state["step"])

    def close(self) -> None:
        close = getattr(self._iterator, "close", None)
        if close is not None:
            close()
