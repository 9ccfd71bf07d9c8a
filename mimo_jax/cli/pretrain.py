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

from typing import Sequence

from absl import app, flags
from ml_collections import config_flags

from mimo_jax.cli import run_command
from mimo_jax.cli.training import run_trainer
from mimo_jax.train import trainer

_CONFIG = config_flags.DEFINE_config_file("config", None, "Run config (a configs/*.py file).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and exports.")
_DISTRIBUTED = flags.DEFINE_boolean(
    "distributed", False, "Call jax.distributed.initialize() first (multi-host runs).")


def _run(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    run_trainer(trainer.run, _CONFIG.value, _WORKDIR.value, _DISTRIBUTED.value,
                example="configs/tiny.py")


def main(argv: Sequence[str] | None = None) -> None:
    """Runs the command on `argv` (program name first; default `sys.argv`), then exits."""
    run_command(_run, argv)
