"""What a launched job runs, independent of XManager (so it is testable anywhere).

A training job is `python -m mimo_jax.train.<kind> --config=... --workdir=... [--distributed]`
plus config overrides (kind: pretrain, sft, mopd); a sweep point's job is `python -m
mimo_jax.ablate --sweep=... --points=<point> --workdir=...`. On a TPU slice the slice name and
the physical topology must agree, and a training run's per-device memory
(`mimo_jax.parallel.memory`) must fit before anything is queued.
"""

from __future__ import annotations

import dataclasses

import ml_collections

from mimo_jax.run_config import parse_assignments
from mimo_jax.train.memory_plan import plan_for_config

# Job kind -> the module `python -m` runs.
ENTRYPOINTS = {"pretrain": "mimo_jax.train.pretrain", "sft": "mimo_jax.train.sft",
               "mopd": "mimo_jax.train.mopd", "sweep": "mimo_jax.ablate"}


def parse_overrides(items: list[str] | tuple[str, ...]) -> dict[str, str]:
    """["train.steps=10", "init_from=DIR"] -> {"config.train.steps": "10", ...}: the training
    commands' `--config.<key>` flags (`mimo_jax.run_config.parse_assignments` splits them)."""
    return {f"config.{key}": value for key, value in parse_assignments(items).items()}


@dataclasses.dataclass(frozen=True)
class Job:
    """The command line of one job: a training run (pretrain, sft, mopd) or one sweep point."""

    kind: str
    config: str  # a config file, or the sweep file for kind "sweep"
    workdir: str
    overrides: tuple[str, ...] = ()
    distributed: bool = False
    point: str | None = None  # the sweep point (kind "sweep" only)

    def __post_init__(self):
        if self.kind not in ENTRYPOINTS:
            raise ValueError(f"job kind {self.kind!r} is not one of {sorted(ENTRYPOINTS)}")
        if (self.kind == "sweep") != (self.point is not None):
            raise ValueError("a sweep job names exactly one point; other jobs name none")

    @property
    def entrypoint(self) -> str:
        return ENTRYPOINTS[self.kind]

    def flags(self) -> list[str]:
        """The command's flags, overrides last."""
        overrides = parse_overrides(self.overrides)
        if self.kind == "sweep":
            flags = [f"--sweep={self.config}", f"--points={self.point}",
                     f"--workdir={self.workdir}"]
            settings = [f"--override={key[len('config.'):]}={value}"
                        for key, value in overrides.items()]
        else:
            flags = [f"--config={self.config}", f"--workdir={self.workdir}"]
            settings = [f"--{key}={value}" for key, value in overrides.items()]
        return flags + (["--distributed"] if self.distributed else []) + settings

    def command(self) -> list[str]:
        """The command line, as a container or a local process runs it."""
        return ["python", "-m", self.entrypoint] + self.flags()


class DoesNotFit(ValueError):
    """A run's memory plan exceeds its slice; the message holds the plan's table."""


def check_memory(config: ml_collections.ConfigDict, slice_name: str,
                 param_dtype: str | None = None) -> str:
    """The plan table of a run config on a slice; raises DoesNotFit if the run does not fit
    (ConfigError, also a ValueError, for a bad config)."""
    result, table = plan_for_config(config, slice_name, param_dtype=param_dtype)
    if not result.fits:
        raise DoesNotFit(f"the run does not fit {slice_name}:\n{table}")
    return table
