r"""`python -m mimo_jax.plan`: prints the bytes per device a training run needs on a named TPU or
GPU slice, and whether it fits.

    python -m mimo_jax.plan --config configs/mimo_v2_flash.py --mesh v5p-512 \
        --param_dtype bfloat16
    python -m mimo_jax.plan --config configs/mimo_v2_flash.py --mesh 8xH200 \
        --config.mesh.ici=fsdp=-1,expert=8 --config.mesh.rules=fsdp_ep

The plan is `mimo_jax.train.memory_plan.plan_for_config`, which says what each row counts; a bad
config value or slice name ends with a usage error naming it.
"""

from __future__ import annotations

from typing import Sequence

from absl import app, flags
from ml_collections import config_flags

from mimo_jax.cli import run_command
from mimo_jax.config import DTYPES, ConfigError
from mimo_jax.train.memory_plan import plan_for_config

_CONFIG = config_flags.DEFINE_config_file("config", None, "Run config (configs/*.py).",
                                          lock_config=False)
_MESH = flags.DEFINE_string("mesh", None, "Slice name: v5p-512, 2xv5p-256, v6e-256, 8xH200, ...")
_PARAM_DTYPE = flags.DEFINE_enum("param_dtype", None, list(DTYPES),
                                 "Parameter (and gradient) dtype; default model.param_dtype.")
_OPT_DTYPE = flags.DEFINE_enum("optimizer_dtype", "float32", list(DTYPES),
                               "dtype of the optimizer moments.")


def _run(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if _CONFIG.value is None:
        raise app.UsageError("--config is required (e.g. configs/mimo_v2_flash.py)")
    if not _MESH.value:
        raise app.UsageError("--mesh is required (e.g. v5p-512)")
    try:
        _, table = plan_for_config(_CONFIG.value, _MESH.value, param_dtype=_PARAM_DTYPE.value,
                                   optimizer_dtype=_OPT_DTYPE.value)
    except (ConfigError, ValueError) as err:
        raise app.UsageError(str(err)) from err
    print(table)


def main(argv: Sequence[str] | None = None) -> None:
    """Runs the command on `argv` (program name first; default `sys.argv`), then exits."""
    run_command(_run, argv)
