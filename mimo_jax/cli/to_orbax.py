r"""`python -m mimo_jax.convert.to_orbax`: a Hugging Face checkpoint -> a params export (Orbax).

    python -m mimo_jax.convert.to_orbax --hf /ckpt/MiMo-V2-Flash --out /exports/mimo \
        --param_dtype=bfloat16

Streams the checkpoint (bf16/f32, or the released FP8 layout, dequantised) one tensor at a time,
with host memory bounded by the largest tensor (`mimo_jax.convert.orbax_export`). The export is
what training (`--config.init_from=/exports/mimo`) and decoding (`python -m mimo_jax.generate
--checkpoint /exports/mimo`) read, each restoring into its shardings. A bad path or value ends
with one line `error: ...` and exit status 1.
"""

from __future__ import annotations

from typing import Sequence

from absl import app, flags

from mimo_jax.cli import exit_after_run, run_command
from mimo_jax.config import DTYPES, ConfigError
from mimo_jax.convert.errors import CheckpointError
from mimo_jax.convert.orbax_export import stream_to_export

_HF = flags.DEFINE_string("hf", None, "Hugging Face checkpoint directory (config.json and "
                          "*.safetensors).")
_OUT = flags.DEFINE_string("out", None, "Directory of the params export to write.")
_PARAM_DTYPE = flags.DEFINE_enum("param_dtype", None, list(DTYPES), "Stored parameter dtype; "
                                 "default: the checkpoint's (the router stays float32).")
_SCAN_LAYERS = flags.DEFINE_boolean("scan_layers", True, "Stack runs of identical layers (the "
                                    "layout training uses).")
_STRICT = flags.DEFINE_boolean("strict", True, "Fail on checkpoint tensors no parameter uses.")
_OVERWRITE = flags.DEFINE_boolean("overwrite", False, "Replace an existing --out.")


def _run(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    try:
        if not _HF.value or not _OUT.value:
            raise CheckpointError("--hf and --out are both required")
        overrides = {"scan_layers": _SCAN_LAYERS.value}
        if _PARAM_DTYPE.value:
            overrides["param_dtype"] = _PARAM_DTYPE.value
        config, out = stream_to_export(_HF.value, _OUT.value, strict=_STRICT.value,
                                       overwrite=_OVERWRITE.value, **overrides)
    except (CheckpointError, ConfigError) as err:
        exit_after_run(f"error: {err}")
    print(f"wrote a params export of {config.num_layers} layers, {config.num_experts} experts, "
          f"{config.param_dtype} parameters to {out}")


def main(argv: Sequence[str] | None = None) -> None:
    """Runs the command on `argv` (program name first; default `sys.argv`), then exits."""
    run_command(_run, argv)
