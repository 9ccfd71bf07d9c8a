r"""`python -m mimo_jax.train.sft`: supervised fine-tuning on prompt/response pairs.

    python -m mimo_jax.train.sft --config configs/sft_tiny.py --workdir /tmp/mimo_sft \
        --config.init_from=/tmp/mimo_tiny/export \
        --config.data.train_sources=jsonl:/data/sft/train.jsonl \
        --config.data.eval_sources=jsonl:/data/sft/test.jsonl

Each line of the JSON-lines files is {"prompt": ..., "response": ...}; the loss counts the
response tokens only, and examples are packed whole. `init_from` names the starting parameters:
a params export, a training workdir or a Hugging Face directory (empty: a random start). The
optimizer and the data start fresh; the architecture must match the config's. Running the same
command again resumes from the newest checkpoint in the workdir (init_from is then not read).
SIGTERM saves a checkpoint and exits 0. A bad config value, data file or init checkpoint ends the
run with one line `error: ...` and exit status 1. The training itself is
`mimo_jax.train.sft_trainer.run`.
"""

from __future__ import annotations

from typing import Sequence

from absl import app, flags
from ml_collections import config_flags

from mimo_jax.cli import run_command
from mimo_jax.cli.training import run_trainer
from mimo_jax.train import sft_trainer

_CONFIG = config_flags.DEFINE_config_file("config", None,
                                          "Run config (a configs/sft_*.py file).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and exports.")
_DISTRIBUTED = flags.DEFINE_boolean(
    "distributed", False, "Call jax.distributed.initialize() first (multi-host runs).")


def _run(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    run_trainer(sft_trainer.run, _CONFIG.value, _WORKDIR.value, _DISTRIBUTED.value,
                example="configs/sft_tiny.py")


def main(argv: Sequence[str] | None = None) -> None:
    """Runs the command on `argv` (program name first; default `sys.argv`), then exits."""
    run_command(_run, argv)
