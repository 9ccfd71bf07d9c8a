"""Frozen, validated configuration of the pretraining trainer (the `train` section of a run config).

The learning-rate schedule is SPEC.md's shape scaled to the run: linear warm-up over
`warmup_fraction` of the steps, constant at `learning_rate` until `decay_start_fraction`, then a
cosine to `end_learning_rate` at the last step (the report: 3.2e-4 -> 1e-4).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from mimo_jax.config import DTYPES
from mimo_jax.config_reader import (Section, above, at_least, fail, one_of, option, parse_value,
                                    read_section, within)

PROGRESS_MODES = ("auto", "bar", "log", "none")
# SPEC.md: cosine from 3.2e-4 down to 1e-4.
END_LR_RATIO = 1e-4 / 3.2e-4


def _no_dtype_or_one_of(value: str) -> str | None:
    return None if value == "" or value in DTYPES else f"must be '' or one of {DTYPES}"


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig(Section):
    """Optimizer, schedule, losses, evaluation, checkpointing and logging of a pretraining run.

    `end_learning_rate` left out (or None) is `learning_rate * END_LR_RATIO`.
    """

    SECTION = "train"

    steps: int = option(check=at_least(1))
    learning_rate: float = option(check=above(0))  # peak
    end_learning_rate: float = option()  # at the last step
    warmup_fraction: float = option(0.05)
    decay_start_fraction: float = option(0.5)
    adam_b1: float = option(0.9, check=within(0, 1))
    adam_b2: float = option(0.95, check=within(0, 1))
    adam_eps: float = option(1e-8, check=above(0))
    weight_decay: float = option(0.1, check=at_least(0))
    clip_norm: float = option(1.0, check=above(0))
    grad_accum_steps: int = option(1, check=at_least(1))
    # The batch ramp (`train/batch_ramp.py`): over the first `batch_ramp_steps` steps (0 = none)
    # the step trains on a linearly growing number of its `grad_accum_steps` micro-batches,
    # from `batch_ramp_start` to all of them.
    batch_ramp_steps: int = option(0, check=at_least(0))
    batch_ramp_start: int = option(1, check=at_least(1))
    mtp_loss_weight: float = option(0.3, check=at_least(0))
    balance_loss_weight: float = option(1e-5, check=at_least(0))
    bias_update_rate: float = option(1e-3, check=at_least(0))
    # "" keeps model.runtime.dtype; "bfloat16" runs the model in bf16 over f32 master weights.
    compute_dtype: str = option("", check=_no_dtype_or_one_of)
    seed: int = option(0)
    log_every: int = option(10, check=at_least(1))
    eval_every: int = option(0, check=at_least(0))  # 0 = only at the end
    checkpoint_every: int = option(1000, check=at_least(1))
    keep_last: int = option(3, check=at_least(1))  # newest checkpoints kept
    # Also keep every checkpoint whose step is a multiple of this (0 = none).
    keep_every: int = option(0, check=at_least(0))
    async_checkpoint: bool = option(True)
    # Consecutive non-finite steps (skipped) before the run stops.
    max_nan_steps: int = option(5, check=at_least(1))
    export_params: bool = option(True)  # write a params-only copy for inference at the end
    progress: str = option("auto", check=one_of(PROGRESS_MODES))
    tensorboard: bool = option(True)
    plot: bool = option(True)
    num_devices: int = option(0, check=at_least(0))  # data-parallel devices; 0 = all

    def validate(self, prefix: str) -> None:
        if not 0 <= self.end_learning_rate <= self.learning_rate:
            fail(f"{prefix}.end_learning_rate", self.end_learning_rate,
                 f"must be in [0, {prefix}.learning_rate={self.learning_rate}]")
        if self.batch_ramp_steps and self.grad_accum_steps == 1:
            fail(f"{prefix}.batch_ramp_steps", self.batch_ramp_steps,
                 "the batch grows by whole micro-batches: it needs "
                 f"{prefix}.grad_accum_steps > 1 (the final batch in that many micro-batches)")
        if self.batch_ramp_start > self.grad_accum_steps:
            fail(f"{prefix}.batch_ramp_start", self.batch_ramp_start,
                 f"counts micro-batches: at most {prefix}.grad_accum_steps="
                 f"{self.grad_accum_steps}")
        if not 0 <= self.warmup_fraction <= self.decay_start_fraction <= 1:
            fail(f"{prefix}.warmup_fraction", self.warmup_fraction,
                 "need 0 <= warmup_fraction <= decay_start_fraction "
                 f"(= {self.decay_start_fraction}) <= 1")

    @classmethod
    def derive(cls, values: dict[str, Any], prefix: str) -> dict[str, Any]:
        """A missing or None `end_learning_rate` follows the report's ratio to `learning_rate`."""
        # None (a ConfigDict's "not set") counts as missing for these.
        values = {key: value for key, value in values.items() if value is not None or key not in (
            "steps", "learning_rate", "end_learning_rate")}
        if "end_learning_rate" not in values and "learning_rate" in values:
            values["end_learning_rate"] = END_LR_RATIO * parse_value(
                float, values["learning_rate"], f"{prefix}.learning_rate")
        return values


def train_config_from_dict(cfg: Mapping[str, Any]) -> TrainConfig:
    """Builds and validates a `TrainConfig` from the `train` section of a run config."""
    return read_section(TrainConfig, cfg)
