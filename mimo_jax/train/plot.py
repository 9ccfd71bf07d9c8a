"""Draws a run's loss curves to PNG.

    python -m mimo_jax.train.plot --workdir DIR [--out DIR/loss.png]
"""

from __future__ import annotations

import sys

from absl import app, flags

from mimo_jax.train.plotting import plot_metrics

_WORKDIR = flags.DEFINE_string("workdir", None, "The training run's directory.")
_OUT = flags.DEFINE_string("out", None, "Output PNG (default: <workdir>/loss.png).")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not _WORKDIR.value:
        sys.exit("error: --workdir is required")
    try:
        path = plot_metrics(_WORKDIR.value, _OUT.value)
    except FileNotFoundError as err:
        sys.exit(f"error: {err}")
    print(f"wrote {path}")


if __name__ == "__main__":
    app.run(main)
