r"""`python -m mimo_jax.train.pretrain`: pretrains MiMo-V2-Flash (or a scaled-down relative).

    python -m mimo_jax.train.pretrain --config configs/tiny.py --workdir /tmp/mimo_tiny
    python -m mimo_jax.train.pretrain --config configs/tiny.py --workdir /tmp/mimo_tiny \
        --config.train.steps=2000 --config.data.batch_size=32

Running the same command again resumes from the newest checkpoint in the workdir. SIGTERM
(what a scheduler sends before preempting a job) saves a checkpoint at the current step and exits
0; a second SIGTERM does not interrupt the save. A bad config value, data path or checkpoint
ends the run with one line `error: ...` and exit status 1; checkpoints already written are kept.
The training itself is `mimo_jax.train.trainer.run` (`mimo_jax.pretrain` in a notebook).
"""

from __future__ import annotations

import signal
import sys
from typing import Sequence

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from mimo_jax.cli import run_command
from mimo_jax.config import ConfigError
from mimo_jax.data.errors import DataError
from mimo_jax.parallel import initialize_distributed
from mimo_jax.train import trainer
from mimo_jax.train.checkpoint import CheckpointError

_CONFIG = config_flags.DEFINE_config_file("config", None, "Run config (a configs/*.py file).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and exports.")
_DISTRIBUTED = flags.DEFINE_boolean(
    "distributed", False, "Call jax.distributed.initialize() first (multi-host runs).")


class _StopFlag:
    """Set by SIGTERM / SIGINT; the training loop polls it after each step."""

    def __init__(self):
        self.requested = False

    def __call__(self, signum, frame) -> None:
        del frame
        if not self.requested:
            print(f"\nreceived {signal.Signals(signum).name}: saving a checkpoint after this "
                  "step", file=sys.stderr, flush=True)
        self.requested = True


def _run(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if _CONFIG.value is None:
        sys.exit("error: --config is required (e.g. --config configs/tiny.py)")
    if not _WORKDIR.value:
        sys.exit("error: --workdir is required")
    logging.set_verbosity(logging.WARNING)  # orbax and grain log every step at INFO
    if _DISTRIBUTED.value:
        initialize_distributed(auto_detect=True)  # TPU pods, SLURM/Kubernetes find their peers

    stop = _StopFlag()
    if jax.process_count() == 1:
        # Multi-host runs leave SIGTERM to JAX's preemption service, which makes every process
        # save at the same step (the trainer asks it after each step).
        signal.signal(signal.SIGTERM, stop)
    try:
        result = trainer.run(_CONFIG.value, _WORKDIR.value, stop_requested=lambda: stop.requested)
    except (ConfigError, DataError, CheckpointError, trainer.TrainingStopped) as err:
        sys.exit(f"error: {err}")
    except KeyboardInterrupt:
        sys.exit("interrupted: checkpoints written so far are kept; rerun the command to resume")
    for line in trainer.summary_lines(result):
        print(line)


def main(argv: Sequence[str] | None = None) -> None:
    """Runs the command on `argv` (program name first; default `sys.argv`), then exits."""
    run_command(_run, argv)
