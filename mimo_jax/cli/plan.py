r"""`python -m mimo_jax.plan`: prints the bytes per device a training run (or, with `--mode
decode`, serving) needs on a named TPU or GPU slice, and whether it fits.

    python -m mimo_jax.plan --config configs/mimo_v2_flash.py --mesh v5p-512 \
        --param_dtype bfloat16
    python -m mimo_jax.plan --config configs/mimo_v2_flash.py --mesh 8xH200 \
        --config.mesh.ici=fsdp=-1,expert=8 --config.mesh.rules=fsdp_ep
    python -m mimo_jax.plan --mode decode --config configs/mimo_v2_flash.py --mesh v5p-64

Training: `mimo_jax.train.memory_plan.plan_for_config`, which says what each row counts.
Decoding: `mimo_jax.inference.decode_plan` (weights in --param_dtype, default bfloat16, and the
KV cache of --batch rows at 32k and 256k tokens). A bad config value or slice name ends with a
usage error naming it.
"""

from __future__ import annotations

from typing import Sequence

from absl import app, flags
from ml_collections import config_flags

from mimo_jax.cli import run_command
from mimo_jax.config import DTYPES, ConfigError, model_config_from_dict
from mimo_jax.inference.decode_plan import format_decode_plan, plan_decode
from mimo_jax.parallel import mesh_config_from_dict
from mimo_jax.parallel.memory import parse_slice
from mimo_jax.train.memory_plan import plan_for_config

_CONFIG = config_flags.DEFINE_config_file("config", None, "Run config (configs/*.py).",
                                          lock_config=False)
_MESH = flags.DEFINE_string("mesh", None, "Slice name: v5p-512, 2xv5p-256, v6e-256, 8xH200, ...")
_PARAM_DTYPE = flags.DEFINE_enum("param_dtype", None, list(DTYPES),
                                 "Parameter (and gradient) dtype; default model.param_dtype.")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "decode"],
                          "Plan a training step or serving (weights + KV cache).")
_BATCH = flags.DEFINE_integer("batch", 0, "Decode mode: rows served at once (0 = one per batch "
                              "shard).")
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
        if _MODE.value == "decode":
            config = _CONFIG.value
            plan = plan_decode(model_config_from_dict(config.model),
                               mesh_config_from_dict(config.get("mesh")),
                               parse_slice(_MESH.value), batch=_BATCH.value,
                               param_dtype=_PARAM_DTYPE.value or "bfloat16")
            table = format_decode_plan(plan, f"decoding ({plan.param_dtype} weights; FP8 "
                                             "weights are not supported yet)")
        else:
            _, table = plan_for_config(_CONFIG.value, _MESH.value,
                                       param_dtype=_PARAM_DTYPE.value,
                                       optimizer_dtype=_OPT_DTYPE.value)
    except (ConfigError, ValueError) as err:
        raise app.UsageError(str(err)) from err
    print(table)


def main(argv: Sequence[str] | None = None) -> None:
    """Runs the command on `argv` (program name first; default `sys.argv`), then exits."""
    run_command(_run, argv)
