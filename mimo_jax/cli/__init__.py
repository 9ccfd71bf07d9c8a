"""The command-line programs, one module per command: flags, printing and exit codes only; the
work is done by the library modules each one names.

    python -m mimo_jax.train.pretrain     cli/pretrain.py         -> mimo_jax.train.trainer
    python -m mimo_jax.train.sft          cli/sft.py              -> mimo_jax.train.sft_trainer
    python -m mimo_jax.train.mopd         cli/mopd.py             -> mimo_jax.train.mopd_trainer
    python -m mimo_jax.train.plot         cli/plot.py             -> mimo_jax.train.curves
    python -m mimo_jax.generate           cli/generate.py         -> mimo_jax.loading, inference
    python -m mimo_jax.summary            cli/summary.py          -> mimo_jax.model.param_count
    python -m mimo_jax.plan               cli/plan.py             -> mimo_jax.train.memory_plan
    python -m mimo_jax.ablate             cli/ablate.py           -> mimo_jax.ablation
    python -m mimo_jax.eval.long_context  cli/long_context.py     -> mimo_jax.eval.context_eval
    python -m mimo_jax.data.to_array_record  cli/to_array_record.py -> mimo_jax.data.token_shards
    python -m mimo_jax.convert.to_orbax   cli/to_orbax.py         -> mimo_jax.convert.orbax_export

The module paths on the left stay what users and launch scripts type; each takes the command's
docstring (its `--help` text) and calls its `main(argv)`. A command module defines its absl flags
when imported, so import one per process (`main` parses them and exits, as `python -m` does).
`cli/training.py` holds what the training commands share: `training_command` defines their
flags (called once, by the command's own module), `run_trainer` runs one with one-line errors.
"""

from __future__ import annotations

import os
import sys
from typing import Callable, Sequence

from absl import app, flags


def run_command(program: Callable[[list[str]], None], argv: Sequence[str] | None) -> None:
    """Runs `program` as an absl app on `argv` (program name first; default `sys.argv`).

    absl's `--help` lists the flags of the module that was started (`sys.argv[0]`, the entry
    module); the flags are defined in the command's module, so they are listed for it too.
    """
    for flag in flags.FLAGS.get_key_flags_for_module(program.__module__):
        flags.FLAGS.register_key_flag_for_module(sys.argv[0], flag)
    app.run(program, argv=None if argv is None else list(argv))


def exit_after_run(message: str) -> None:
    """Ends a command whose run has begun with `message` as its last line on stderr (status 1).

    The run has already stopped its data workers and waited for its checkpoints; what Orbax's
    and Grain's background threads may still print while the interpreter tears them down
    (e.g. `RuntimeError: cannot schedule new futures after shutdown`) would bury the one line
    that says what went wrong, so stderr is closed after it.
    """
    print(message, file=sys.stderr, flush=True)
    sys.stdout.flush()
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stderr.fileno())
    sys.exit(1)
