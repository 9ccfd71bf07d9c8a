"""`python -m mimo_jax.summary`: prints a config's parameter count per component, in total and
active per token.

    python -m mimo_jax.summary --config configs/mimo_v2_flash.py --config.model.num_layers=12

The table is `mimo_jax.model.param_count.summary` (`mimo_jax.summary` in a notebook); a bad
config value stops with `ConfigError` naming the key and the value.
"""

from __future__ import annotations

from typing import Sequence

from absl import app
from ml_collections import config_flags

from mimo_jax.cli import run_command
from mimo_jax.model.param_count import summary

_CONFIG = config_flags.DEFINE_config_file("config", None, "Run config (configs/*.py).",
                                          lock_config=True)


def _run(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if _CONFIG.value is None:
        raise app.UsageError("--config is required, e.g. --config configs/mimo_v2_flash.py")
    print(summary(_CONFIG.value))


def main(argv: Sequence[str] | None = None) -> None:
    """Runs the command on `argv` (program name first; default `sys.argv`), then exits."""
    run_command(_run, argv)
