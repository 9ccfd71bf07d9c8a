"""What the training commands (`pretrain`, `sft`, `mopd`) share: their flags, the stop flag that
SIGTERM sets, and running a trainer with one-line errors. Not a command itself: it defines flags
only when a command's module calls `training_command`."""

from __future__ import annotations

import signal
import sys
from typing import Callable, Sequence

import jax
import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

from mimo_jax.cli import exit_after_run, run_command
from mimo_jax.config import ConfigError
from mimo_jax.data.errors import DataError
from mimo_jax.parallel import initialize_distributed
from mimo_jax.train import trainer
from mimo_jax.train.checkpoint import CheckpointError

# run(config, workdir, stop_requested=...) -> RunResult, e.g. `trainer.run`.
Trainer = Callable[..., trainer.RunResult]


class StopFlag:
    """Set by SIGTERM / SIGINT; the training loop polls it after each step."""

    def __init__(self):
        self.requested = False

    def __call__(self, signum, frame) -> None:
        del frame
        if not self.requested:
            print(f"\nreceived {signal.Signals(signum).name}: saving a checkpoint after this "
                  "step", file=sys.stderr, flush=True)
        self.requested = True


def run_trainer(run: Trainer, config: ml_collections.ConfigDict | None, workdir: str | None,
                distributed: bool, example: str) -> None:
    """Checks the flags, runs `run(config, workdir)` and prints where everything is; a bad
    config, data path or checkpoint exits with one line `error: ...` (status 1).

    example: a `--config` value for the message when it is missing.
    """
    if config is None:
        sys.exit(f"error: --config is required (e.g. --config {example})")
    if not workdir:
        sys.exit("error: --workdir is required")
    logging.set_verbosity(logging.WARNING)  # orbax and grain log every step at INFO
    if distributed:
        initialize_distributed(auto_detect=True)  # TPU pods, SLURM/Kubernetes find their peers

    stop = StopFlag()
    if jax.process_count() == 1:
        # Multi-host runs leave SIGTERM to JAX's preemption service, which makes every process
        # save at the same step (the trainer asks it after each step).
        signal.signal(signal.SIGTERM, stop)
    try:
        result = run(config, workdir, stop_requested=lambda: stop.requested)
    except (ConfigError, DataError, CheckpointError, trainer.TrainingStopped) as err:
        exit_after_run(f"error: {err}")
    except KeyboardInterrupt:
        exit_after_run("interrupted: checkpoints written so far are kept; rerun the command to resume")
    for line in trainer.summary_lines(result):
        print(line)


def training_command(run: Trainer, example: str) -> Callable[[Sequence[str] | None], None]:
    """Defines a training command's flags (`--config`, `--workdir`, `--distributed`) and returns
    its `main(argv)`, which runs `run` through `run_trainer`. Call once, from the command's module.

    example: the config file the messages suggest (e.g. "configs/tiny.py").
    """
    config = config_flags.DEFINE_config_file("config", None, f"Run config (e.g. {example}).")
    workdir = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and exports.")
    distributed = flags.DEFINE_boolean(
        "distributed", False, "Call jax.distributed.initialize() first (multi-host runs).")

    def _run(argv: list[str]) -> None:
        if len(argv) > 1:
            raise app.UsageError(f"unexpected arguments: {argv[1:]}")
        run_trainer(run, config.value, workdir.value, distributed.value, example=example)

    def main(argv: Sequence[str] | None = None) -> None:
        """Runs the command on `argv` (program name first; default `sys.argv`), then exits."""
        run_command(_run, argv)

    return main
