"""The training loop and its standard hooks, on a toy step (a running weighted sum, no model).

The step adds `learning_rate * sum(batch)` to `params` unless the batch holds a NaN, in which
case it reports `finite=False` and keeps `params`, as the pretraining step does. Batch i (from 1)
is [i, i + 0.5]; the stream's state is the number of batches handed out.
"""

import pathlib
from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mimo_jax.data.errors import DataError
from mimo_jax.train import loop as loop_lib
from mimo_jax.train.hooks import (Checkpoint, Evaluation, MetricsLog, NonFiniteSteps,
                                  Preemption, Throughput)
from mimo_jax.train.loop import Batches, Hook, StepInfo, StopLoop, TrainingStopped, TrainLoop
from mimo_jax.train.metrics import MetricsWriter, Progress, read_metrics


class ToyState(NamedTuple):
    step: jax.Array
    params: jax.Array


@jax.jit
def toy_step(state: ToyState, batch: dict, learning_rate: jax.Array):
    value = jnp.sum(batch["x"])
    finite = jnp.isfinite(value)
    params = jnp.where(finite, state.params + learning_rate * value, state.params)
    metrics = {"loss": value, "ce": value / 2, "grad_norm": value * 3, "finite": finite,
               "tokens": jnp.int32(batch["x"].size)}
    return ToyState(state.step + 1, params), metrics


def initial_state() -> ToyState:
    return ToyState(jnp.int32(0), jnp.float32(1.0))


def schedule(step: int) -> float:
    return 0.25 + 0.5 * step


class NumberStream:
    """Batch i (from 1) is {"x": [i, i + 0.5]}; NaN in the batches of `nan_batches`; reading
    batch `fail_batch` raises; each read costs `clock.tick` seconds on `clock` if given."""

    def __init__(self, nan_batches=(), fail_batch=None, clock=None):
        self.handed_out = 0
        self._nan_batches = set(nan_batches)
        self._fail_batch = fail_batch
        self._clock = clock

    def __iter__(self):
        return self

    def __next__(self):
        number = self.handed_out + 1
        if number == self._fail_batch:
            raise ValueError(f"record {number} is corrupt")
        if self._clock is not None:
            self._clock.now += self._clock.tick
        self.handed_out = number
        x = np.array([number, number + 0.5], np.float32)
        if number in self._nan_batches:
            x[0] = np.nan
        return {"x": x}

    def get_state(self):
        return {"handed_out": self.handed_out}

    def set_state(self, state):
        self.handed_out = state["handed_out"]


class Recorder(Hook):
    """Appends (name, event, step) for every event to a shared list."""

    def __init__(self, name: str, events: list):
        self._name = name
        self._events = events

    def on_start(self, info):
        self._events.append((self._name, "start", info.step))

    def on_step(self, info):
        self._events.append((self._name, "step", info.step))

    def on_stop(self, info):
        self._events.append((self._name, "stop", info.step))

    def on_end(self, info):
        self._events.append((self._name, "end", info.step))


class FakeCheckpointer:
    """What the hooks use of `Checkpointer`, keeping saves in memory (as host values)."""

    directory = pathlib.Path("/runs/toy/checkpoints")

    def __init__(self):
        self.saved: dict[int, tuple] = {}
        self.waits = 0

    def save(self, step, state, data_state, meta):
        assert meta == {"run": "toy"}
        self.saved[step] = (jax.device_get(state), data_state)

    def wait(self):
        self.waits += 1

    def latest_step(self):
        return max(self.saved) if self.saved else None


def make_loop(steps: int, messages: list | None = None) -> TrainLoop:
    say = messages.append if messages is not None else print
    return TrainLoop(toy_step, steps=steps, learning_rate=schedule, say=say)


def expected_params(first: int, last: int, start_value: float = 1.0) -> np.float32:
    """The toy state's params after steps first..last (each adds schedule(step-1) * sum)."""
    value = np.float32(start_value)
    for step in range(first, last + 1):
        value = np.float32(value + np.float32(schedule(step - 1)) * np.float32(2 * step + 0.5))
    return value


def test_hooks_fire_at_their_steps_in_the_order_added():
    events: list = []
    loop = make_loop(7)
    loop.add_hook(Recorder("a", events), every=2)
    loop.add_hook(lambda info: events.append(("fn", "step", info.step)), every=3)
    loop.add_hook(Recorder("c", events), every=0)
    end = loop.run(initial_state(), Batches(NumberStream()))
    assert end.done and end.info.step == 7
    assert events == [("a", "start", 0), ("c", "start", 0),
                      ("a", "step", 2), ("fn", "step", 3), ("a", "step", 4),
                      ("a", "step", 6), ("fn", "step", 6),
                      ("a", "end", 7), ("c", "end", 7)]


def test_step_info_holds_host_metrics_the_state_and_the_data_position():
    seen: list[StepInfo] = []
    loop = make_loop(5)
    loop.add_hook(seen.append)
    end = loop.run(initial_state(), Batches(NumberStream()))
    assert [info.step for info in seen] == [1, 2, 3, 4, 5]
    for info in seen:
        assert isinstance(info.metrics["loss"], np.ndarray)  # fetched to the host
        assert float(info.metrics["loss"]) == 2 * info.step + 0.5
        assert info.finite and info.seconds >= 0
        assert info.data_state == {"handed_out": info.step}  # "`step` batches consumed"
        assert int(info.state.step) == info.step
        np.testing.assert_allclose(info.state.params, expected_params(1, info.step), rtol=1e-6)
    assert end.info is seen[-1]


def test_a_finished_run_only_runs_start_and_end():
    events: list = []
    loop = make_loop(4)
    loop.add_hook(Recorder("a", events))
    stream = NumberStream()
    end = loop.run(initial_state(), Batches(stream, {"handed_out": 4}), start=4)
    assert end.done and end.info.metrics is None and end.info.data_state == {"handed_out": 4}
    assert events == [("a", "start", 4), ("a", "end", 4)]
    assert stream.handed_out == 4  # no batch read


def test_preemption_saves_the_current_step_and_skips_later_hooks():
    events: list = []
    messages: list = []
    checkpointer = FakeCheckpointer()
    loop = make_loop(10, messages)
    checkpoint = loop.add_hook(Checkpoint(checkpointer, {"run": "toy"}), every=3)
    loop.add_hook(Preemption(lambda: False, reached_preemption=lambda step: step == 5))
    loop.add_hook(Recorder("eval", events), every=5)
    end = loop.run(initial_state(), Batches(NumberStream()))
    assert not end.done and isinstance(end.stopped_by, StopLoop) and end.info.step == 5
    assert sorted(checkpointer.saved) == [3, 5] and checkpoint.last_saved == 5
    assert checkpointer.saved[5][1] == {"handed_out": 5}
    assert checkpointer.waits == 1
    assert messages == ["stop requested: checkpoint saved at step 5"]
    assert events == [("eval", "start", 0), ("eval", "stop", 5)]  # no eval at 5, no end


def test_resume_from_a_saved_position_repeats_the_straight_run():
    def losses_of(loop: TrainLoop) -> list:
        losses: list = []
        loop.add_hook(lambda info: losses.append((info.step, info.metrics["loss"].item())))
        return losses

    straight = make_loop(10)
    straight_losses = losses_of(straight)
    straight_end = straight.run(initial_state(), Batches(NumberStream(nan_batches=(7,))))

    checkpointer = FakeCheckpointer()
    stopped = make_loop(10, messages=[])
    stopped.add_hook(Checkpoint(checkpointer, {"run": "toy"}), every=4)
    requests = iter([False, False, False, False, False, True])
    stopped.add_hook(Preemption(lambda: next(requests)))
    assert stopped.run(initial_state(), Batches(NumberStream(nan_batches=(7,)))).info.step == 6

    state, position = checkpointer.saved[6]
    resumed = make_loop(10)
    resumed_losses = losses_of(resumed)
    resumed_end = resumed.run(state, Batches(NumberStream(nan_batches=(7,)), position), start=6)
    assert resumed_losses[0][0] == 7
    np.testing.assert_equal(resumed_losses, straight_losses[6:])  # NaN at step 7 included
    chex.assert_trees_all_equal(resumed_end.info.state, straight_end.info.state)


def test_non_finite_steps_skip_saves_and_too_many_stop_the_run():
    messages: list = []
    checkpointer = FakeCheckpointer()
    loop = make_loop(8, messages)
    non_finite = loop.add_hook(NonFiniteSteps(3, checkpointer, messages.append))
    loop.add_hook(Checkpoint(checkpointer, {"run": "toy"}), every=1)
    end = loop.run(initial_state(), Batches(NumberStream(nan_batches=(4, 5))))
    assert end.done and non_finite.skipped == 2 and non_finite.in_a_row == 0
    assert sorted(checkpointer.saved) == [1, 2, 3, 6, 7, 8]
    assert messages == [f"step {step}: non-finite loss nan or gradient norm nan; update "
                        f"skipped ({count} in a row)" for step, count in ((4, 1), (5, 2))]
    np.testing.assert_allclose(checkpointer.saved[6][0].params,
                               expected_params(6, 6, expected_params(1, 3)), rtol=1e-6)

    events: list = []
    checkpointer = FakeCheckpointer()
    loop = make_loop(8, [])
    loop.add_hook(NonFiniteSteps(3, checkpointer, lambda _: None))
    loop.add_hook(Checkpoint(checkpointer, {"run": "toy"}), every=1)
    loop.add_hook(Recorder("after", events), every=1)
    with pytest.raises(TrainingStopped, match=r"^3 non-finite steps in a row \(up to step 6\); "
                                              r"stopped without saving. Last good checkpoint: "
                                              r"/runs/toy/checkpoints/3$"):
        loop.run(initial_state(), Batches(NumberStream(nan_batches=(4, 5, 6))))
    assert sorted(checkpointer.saved) == [1, 2, 3]
    assert events[-1] == ("after", "step", 5)  # neither stop nor end hooks ran


def test_data_error_saves_the_last_finished_step_then_raises():
    events: list = []
    checkpointer = FakeCheckpointer()
    loop = make_loop(10, [])
    loop.add_hook(Checkpoint(checkpointer, {"run": "toy"}), every=2)
    loop.add_hook(Recorder("r", events), every=1)
    with pytest.raises(DataError, match=r"^reading training batch 4 failed \(record 4 is "
                                        r"corrupt\); checkpoint saved at step 3$"):
        loop.run(initial_state(), Batches(NumberStream(fail_batch=4)))
    assert sorted(checkpointer.saved) == [2, 3]
    state, position = checkpointer.saved[3]
    assert position == {"handed_out": 3}
    np.testing.assert_allclose(state.params, expected_params(1, 3), rtol=1e-6)
    assert events[-2:] == [("r", "step", 2), ("r", "stop", 3)]  # step 3's hooks never ran


class FakeClock:
    """`time` for the loop: `perf_counter` reads `now`, which batch reads and hooks advance."""

    def __init__(self, tick: float):
        self.now = 1000.0
        self.tick = tick

    def perf_counter(self) -> float:
        return self.now


def test_metrics_log_times_only_training(tmp_path, monkeypatch, capsys):
    clock = FakeClock(tick=0.5)  # each batch read takes 0.5 s; the step itself no time
    monkeypatch.setattr(loop_lib, "time", clock)
    writer = MetricsWriter(tmp_path, 0, tensorboard=False)
    progress = Progress("log", 0, 6, 2)
    seconds: list = []
    loop = make_loop(6, [])
    loop.add_hook(lambda info: seconds.append(info.seconds))
    loop.add_hook(MetricsLog(writer, progress, steps=6, log_every=2,
                             record_keys=("loss", "grad_norm")))

    def slow_eval(info):
        clock.now += 100.0

    loop.add_hook(slow_eval, every=2)
    loop.run(initial_state(), Batches(NumberStream(nan_batches=(3,), clock=clock)))
    writer.close()
    assert seconds == [0.5, 0.5, 0.5, 0.5, 0.5, 0.0]  # the last step reads no batch
    records = read_metrics(tmp_path)
    assert [(r["step"], r["skipped"]) for r in records] == [(2, False), (3, True), (4, False),
                                                            (6, False)]
    # Step 1 (compilation) is left out; then 2 tokens per 0.5 s over the last 2 steps.
    assert [r["tokens_per_sec"] for r in records] == [4.0, 4.0, 4.0, 8.0]
    assert records[0]["loss"] == 4.5 and records[0]["grad_norm"] == 13.5
    assert records[1]["loss"] == "nan"
    assert capsys.readouterr().out.splitlines() == [
        "step 2/6  loss 4.5000  ce 2.2500  tok/s 4",
        "step 4/6  loss 8.5000  ce 4.2500  tok/s 4",
        "step 6/6  loss 12.5000  ce 6.2500  tok/s 8"]


def test_evaluation_at_start_every_n_and_once_at_the_end(tmp_path):
    evaluated: list = []

    def evaluate(params):
        evaluated.append(float(params))
        return {"loss": float(params) / 10, "perplexity": float(np.exp(float(params) / 10))}

    for steps, expected_steps in ((7, [0, 3, 6, 7]), (6, [0, 3, 6])):
        evaluated.clear()
        messages: list = []
        (tmp_path / str(steps)).mkdir()
        writer = MetricsWriter(tmp_path / str(steps), 0, tensorboard=False)
        loop = make_loop(steps, messages)
        evaluation = loop.add_hook(Evaluation(evaluate, writer, messages.append, at_start=True),
                                   every=3)
        loop.run(initial_state(), Batches(NumberStream()))
        writer.close()
        records = read_metrics(tmp_path / str(steps))
        assert [r["step"] for r in records] == expected_steps
        params = [1.0] + [float(expected_params(1, s)) for s in expected_steps[1:]]
        np.testing.assert_allclose(evaluated, params, rtol=1e-6)
        assert evaluation.first_loss == pytest.approx(0.1)
        assert evaluation.final_loss == pytest.approx(params[-1] / 10)
        assert messages[0] == "step 0: eval loss 0.1000"
        assert messages[-1] == (f"step {steps}: eval loss {params[-1] / 10:.4f} "
                                f"perplexity {np.exp(params[-1] / 10):.2f}")


def test_batches_hand_out_a_read_ahead_batch_with_its_position():
    batches = Batches(NumberStream(), {"handed_out": 2})
    assert batches.state == {"handed_out": 2}
    batches.read_ahead()
    assert batches.state == {"handed_out": 2}  # not handed out yet
    np.testing.assert_array_equal(next(batches)["x"], [3.0, 3.5])
    assert batches.state == {"handed_out": 3}
    np.testing.assert_array_equal(next(batches)["x"], [4.0, 4.5])
    assert batches.state == {"handed_out": 4}


def test_throughput_window_keeps_the_last_intervals():
    throughput = Throughput(window=2)
    assert throughput.tokens_per_sec is None
    for tokens, seconds in ((100, 1.0), (300, 1.0), (500, 3.0)):
        throughput.add(tokens, seconds)
    assert throughput.tokens_per_sec == pytest.approx(800 / 4.0)


def test_bad_settings_are_named():
    with pytest.raises(ValueError, match="steps = -1: must be an int >= 0"):
        make_loop(-1)
    loop = make_loop(3)
    with pytest.raises(ValueError, match="hook every = 2.5: must be an int >= 0"):
        loop.add_hook(lambda info: None, every=2.5)
    with pytest.raises(TypeError, match="hook 'save' is neither a Hook nor a function"):
        loop.add_hook("save")
