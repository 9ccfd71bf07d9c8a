r"""`python -m mimo_jax.ablate`: runs an ablation sweep, or tabulates one.

    python -m mimo_jax.ablate --sweep configs/ablations/attention.py --workdir runs/ablate_attention
    python -m mimo_jax.ablate --sweep configs/ablations/mtp.py --workdir DIR --points mtp_0,mtp_3 \
        --override train.steps=100
    python -m mimo_jax.ablate --table runs/ablate_attention

`--sweep` pretrains the sweep's points in turn, each in `<workdir>/<point>` (a finished point is
kept, an interrupted one resumes), then writes the table. `--list` prints the points and exits.
`--table DIR` collects every trained point under DIR into `DIR/ablation.md` and
`DIR/ablation.png` and prints the table. The work is `mimo_jax.ablation`; a bad sweep file, point
name or override ends with one line `error: ...` and exit status 1, before anything trains.
"""

from __future__ import annotations

import signal
import sys
from typing import Sequence

import jax
from absl import app, flags, logging

from mimo_jax.ablation import sweep as sweep_lib
from mimo_jax.ablation import table as table_lib
from mimo_jax.cli import exit_after_run, run_command
from mimo_jax.cli.training import StopFlag
from mimo_jax.config import ConfigError
from mimo_jax.data.errors import DataError
from mimo_jax.parallel import initialize_distributed
from mimo_jax.run_config import parse_assignments
from mimo_jax.train.checkpoint import CheckpointError
from mimo_jax.train.trainer import TrainingStopped

_SWEEP = flags.DEFINE_string("sweep", None, "Sweep file (configs/ablations/*.py) to run.")
_WORKDIR = flags.DEFINE_string("workdir", None, "The sweep's directory (one subdirectory a point).")
_POINTS = flags.DEFINE_list("points", [], "Run only these points (default: all).")
_OVERRIDES = flags.DEFINE_multi_string(
    "override", [], "section.key=value set in every point, e.g. train.steps=100.")
_LIST = flags.DEFINE_boolean("list", False, "Print the sweep's points and exit.")
_TABLE = flags.DEFINE_string("table", None, "Tabulate the trained points under this directory.")
_DISTRIBUTED = flags.DEFINE_boolean(
    "distributed", False, "Call jax.distributed.initialize() first (multi-host runs).")


def _print_table(directory: str) -> None:
    text, plot = table_lib.write_table(directory)
    print(text + f"\nwrote {plot} and {plot.with_name(table_lib.TABLE_FILE)}")


def _run(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if bool(_SWEEP.value) == bool(_TABLE.value):
        sys.exit("error: give either --sweep FILE (with --workdir) or --table DIR")
    logging.set_verbosity(logging.WARNING)
    try:
        if _TABLE.value:
            _print_table(_TABLE.value)
            return
        overrides = parse_assignments(_OVERRIDES.value)
        if _LIST.value:
            for name in sweep_lib.point_configs(_SWEEP.value, _POINTS.value, overrides):
                print(name)
            return
        if not _WORKDIR.value:
            sys.exit("error: --workdir is required with --sweep")
        if _DISTRIBUTED.value:
            initialize_distributed(auto_detect=True)
        stop = StopFlag()
        if jax.process_count() == 1:  # multi-host: JAX's preemption service (see cli/training)
            signal.signal(signal.SIGTERM, stop)
        done = sweep_lib.run_sweep(_SWEEP.value, _WORKDIR.value, _POINTS.value, overrides,
                                   stop_requested=lambda: stop.requested)
        if done:
            _print_table(_WORKDIR.value)
    except (ConfigError, DataError, CheckpointError, TrainingStopped, FileNotFoundError) as err:
        exit_after_run(f"error: {err}")
    except KeyboardInterrupt:
        exit_after_run("interrupted: finished points are kept; rerun the command to resume the sweep")


def main(argv: Sequence[str] | None = None) -> None:
    """Runs the command on `argv` (program name first; default `sys.argv`), then exits."""
    run_command(_run, argv)
