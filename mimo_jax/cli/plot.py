"""`python -m mimo_jax.train.plot`: draws a training run's loss curves to PNG.

    python -m mimo_jax.train.plot --workdir DIR [--out DIR/loss.png]

The drawing is `mimo_jax.train.curves.plot_metrics`; a workdir without metrics ends with one line
`error: ...` and exit status 1.
"""

from __future__ import annotations

import sys
from typing import Sequence

from absl import app, flags

from mimo_jax.cli import run_command
from mimo_jax.train.curves import plot_metrics

_WORKDIR = flags.DEFINE_string("workdir", None, "The training run's directory.")
_OUT = flags.DEFINE_string("out", None, "Output PNG (default: <workdir>/loss.png).")


def _run(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not _WORKDIR.value:
        sys.exit("error: --workdir is required")
    try:
        path = plot_metrics(_WORKDIR.value, _OUT.value)
    except FileNotFoundError as err:
        sys.exit(f"error: {err}")
    print(f"wrote {path}")


def main(argv: Sequence[str] | None = None) -> None:
    """Runs the command on `argv` (program name first; default `sys.argv`), then exits."""
    run_command(_run, argv)
