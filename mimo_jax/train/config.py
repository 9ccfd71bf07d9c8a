"""Frozen, validated configuration of the pretraining trainer (the `train` section of a run config).

The learning-rate schedule is SPEC.md's shape scaled to the run: linear warm-up over
`warmup_fraction` of the steps, constant at `learning_rate` until `decay_start_fraction`, then a
cosine to `end_learning_rate` at the last step (the report: 3.2e-4 -> 1e-4).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from mimo_jax.config import DTYPES, ConfigError

PROGRESS_MODES = ("auto", "bar", "log", "none")


def _fail(key: str, value: Any, why: str) -> None:
    raise ConfigError(f"config key {key!r} = {value!r}: {why}")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Optimizer, schedule, losses, evaluation, checkpointing and logging of a pretraining run."""

    steps: int
    learning_rate: float  # peak
    end_learning_rate: float  # at the last step
    warmup_fraction: float
    decay_start_fraction: float
    adam_b1: float
    adam_b2: float
    adam_eps: float
    weight_decay: float
    clip_norm: float
    grad_accum_steps: int
    mtp_loss_weight: float
    balance_loss_weight: float
    bias_update_rate: float
    compute_dtype: str  # "" keeps model.dtype; "bfloat16" runs the model in bf16, f32 master weights
    seed: int
    log_every: int
    eval_every: int  # 0 = only at the end
    checkpoint_every: int
    keep_last: int  # newest checkpoints kept
    keep_every: int  # also keep every checkpoint whose step is a multiple of this (0 = none)
    async_checkpoint: bool
    max_nan_steps: int  # consecutive non-finite steps (skipped) before the run stops
    export_params: bool  # write a params-only copy for inference at the end
    progress: str
    tensorboard: bool
    plot: bool
    num_devices: int  # data-parallel devices; 0 = all

    def validate(self) -> "TrainConfig":
        for name in ("steps", "grad_accum_steps", "log_every", "checkpoint_every", "keep_last",
                     "max_nan_steps"):
            if getattr(self, name) < 1:
                _fail(f"train.{name}", getattr(self, name), "must be >= 1")
        for name in ("eval_every", "keep_every", "num_devices"):
            if getattr(self, name) < 0:
                _fail(f"train.{name}", getattr(self, name), "must be >= 0")
        if not self.learning_rate > 0:
            _fail("train.learning_rate", self.learning_rate, "must be > 0")
        if not 0 <= self.end_learning_rate <= self.learning_rate:
            _fail("train.end_learning_rate", self.end_learning_rate,
                  f"must be in [0, train.learning_rate={self.learning_rate}]")
        if not 0 <= self.warmup_fraction <= self.decay_start_fraction <= 1:
            _fail("train.warmup_fraction", self.warmup_fraction,
                  "need 0 <= warmup_fraction <= decay_start_fraction "
                  f"(= {self.decay_start_fraction}) <= 1")
        for name in ("adam_b1", "adam_b2"):
            if not 0 <= getattr(self, name) < 1:
                _fail(f"train.{name}", getattr(self, name), "must be in [0, 1)")
        for name in ("adam_eps", "clip_norm"):
            if not getattr(self, name) > 0:
                _fail(f"train.{name}", getattr(self, name), "must be > 0")
        for name in ("weight_decay", "mtp_loss_weight", "balance_loss_weight", "bias_update_rate"):
            if getattr(self, name) < 0:
                _fail(f"train.{name}", getattr(self, name), "must be >= 0")
        if self.compute_dtype and self.compute_dtype not in DTYPES:
            _fail("train.compute_dtype", self.compute_dtype, f"must be '' or one of {DTYPES}")
        if self.progress not in PROGRESS_MODES:
            _fail("train.progress", self.progress, f"must be one of {PROGRESS_MODES}")
        return self


_DEFAULTS: dict[str, Any] = dict(
    end_learning_rate=None, warmup_fraction=0.05, decay_start_fraction=0.5, adam_b1=0.9,
    adam_b2=0.95, adam_eps=1e-8, weight_decay=0.1, clip_norm=1.0, grad_accum_steps=1,
    mtp_loss_weight=0.3, balance_loss_weight=1e-5, bias_update_rate=1e-3, compute_dtype="",
    seed=0, log_every=10, eval_every=0, checkpoint_every=1000, keep_last=3, keep_every=0,
    async_checkpoint=True, max_nan_steps=5, export_params=True, progress="auto",
    tensorboard=True, plot=True, num_devices=0)
# SPEC.md: cosine from 3.2e-4 down to 1e-4.
END_LR_RATIO = 1e-4 / 3.2e-4


def train_config_from_dict(cfg: Mapping[str, Any]) -> TrainConfig:
    """Builds and validates a `TrainConfig` from the `train` section of a run config."""
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    for key in cfg.keys():
        if key not in known:
            raise ConfigError(f"config key 'train.{key}' is unknown; known keys: {sorted(known)}")
    values = dict(_DEFAULTS)
    values.update({k: v for k, v in dict(cfg).items()})
    for key in ("steps", "learning_rate"):
        if values.get(key) is None:
            raise ConfigError(f"config key 'train.{key}' is missing")
    if values["end_learning_rate"] is None:
        values["end_learning_rate"] = float(values["learning_rate"]) * END_LR_RATIO
    kinds = {f.name: f.type for f in dataclasses.fields(TrainConfig)}
    cast = {"int": int, "float": float, "bool": bool, "str": str}
    try:
        typed = {k: cast[kinds[k]](v) for k, v in values.items()}
    except (TypeError, ValueError) as err:
        raise ConfigError(f"config section 'train' has a value of the wrong type: {err}") from err
    return TrainConfig(**typed).validate()
