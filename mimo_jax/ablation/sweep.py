"""Sweeps: a file of named run configs (its points), each trained into its own workdir.

A sweep file is a Python file with `get_sweep() -> dict[str, ConfigDict]` (configs/ablations/).
`run_sweep` pretrains its points one after another into `<workdir>/<point>`; a point whose run
finished is skipped, an interrupted one resumes (the trainer's own resume), so rerunning the
command completes a sweep. Points with the same data section share the tokenizer the first of
them trained: BPE training is deterministic, so this only saves its time.
"""

from __future__ import annotations

import json
import pathlib
import re
from typing import Any, Callable, Mapping, Sequence

import ml_collections

from mimo_jax.config import ConfigError
from mimo_jax.data.pipeline import TOKENIZER_FILE
from mimo_jax.run_config import config_module, override
from mimo_jax.train import trainer
from mimo_jax.train.checkpoint import CHECKPOINT_DIR
from mimo_jax.train.metrics import read_metrics

SWEEP_FILE = "sweep.json"  # in the sweep's workdir: the sweep file, its points and overrides
_POINT_NAME = re.compile(r"[A-Za-z0-9_.-]+")


def load_sweep(source: str | pathlib.Path) -> dict[str, ml_collections.ConfigDict]:
    """The points of a sweep file, in its order; a bad file or point name raises ConfigError."""
    module = config_module(source)
    get_sweep = getattr(module, "get_sweep", None)
    if not callable(get_sweep):
        raise ConfigError(f"sweep {str(source)!r} defines no get_sweep() function")
    sweep = get_sweep()
    if not isinstance(sweep, Mapping) or not sweep:
        raise ConfigError(f"sweep {str(source)!r}: get_sweep() must return a non-empty dict of "
                          f"point name -> ConfigDict, got {type(sweep).__name__}")
    for name, config in sweep.items():
        if not isinstance(name, str) or not _POINT_NAME.fullmatch(name):
            raise ConfigError(f"sweep {str(source)!r}: point name {name!r} must be letters, "
                              "digits, '_', '.' or '-' (it names a directory)")
        if not isinstance(config, ml_collections.ConfigDict):
            raise ConfigError(f"sweep {str(source)!r}: point {name!r} is a "
                              f"{type(config).__name__}, not a ConfigDict")
    return dict(sweep)


def select_points(sweep: Mapping[str, Any], names: Sequence[str] | None) -> list[str]:
    """`names` in sweep order (all points when empty); an unknown name raises ConfigError."""
    if not names:
        return list(sweep)
    unknown = [name for name in names if name not in sweep]
    if unknown:
        raise ConfigError(f"unknown sweep point(s) {', '.join(map(repr, unknown))}; the sweep "
                          f"has {', '.join(sweep)}")
    return [name for name in sweep if name in names]


def point_configs(source: str | pathlib.Path, names: Sequence[str] | None = None,
                  overrides: Mapping[str, Any] | None = None
                  ) -> dict[str, ml_collections.ConfigDict]:
    """The selected points' run configs with `overrides` ({"train.steps": "50"}) applied to
    each, validated (a bad value raises ConfigError naming the point) before anything runs."""
    return _configured(load_sweep(source), names, overrides)


def _configured(sweep: Mapping[str, ml_collections.ConfigDict], names: Sequence[str] | None,
                overrides: Mapping[str, Any] | None) -> dict[str, ml_collections.ConfigDict]:
    configs = {}
    for name in select_points(sweep, names):
        config = sweep[name]
        try:
            for key, value in (overrides or {}).items():
                override(config, key, value)
            trainer.build_configs(config)
        except ConfigError as err:
            raise ConfigError(f"sweep point {name!r}: {err}") from err
        configs[name] = config
    return configs


def finished(workdir: pathlib.Path, steps: int) -> bool:
    """Whether the run in `workdir` reached step `steps` and saved its final checkpoint."""
    logged = any(r.get("kind") == "train" and r.get("step") == steps for r in read_metrics(workdir))
    return logged and (workdir / CHECKPOINT_DIR / str(steps)).is_dir()


def run_sweep(source: str | pathlib.Path, workdir: str | pathlib.Path,
              names: Sequence[str] | None = None, overrides: Mapping[str, Any] | None = None,
              log: Callable[[str], None] = print, **run_kwargs) -> list[pathlib.Path]:
    """Pretrains the selected points into `<workdir>/<point>` in turn; returns their workdirs.

    `run_kwargs` go to `mimo_jax.train.trainer.run` (e.g. stop_requested). A point whose run
    already reached its last step is not run again. `<workdir>/sweep.json` records the sweep's
    every point (in order, whichever are selected: one launched job per point writes the same).
    """
    root = pathlib.Path(workdir)
    sweep = load_sweep(source)
    configs = _configured(sweep, names, overrides)
    root.mkdir(parents=True, exist_ok=True)
    (root / SWEEP_FILE).write_text(json.dumps(
        {"sweep": str(source), "points": list(sweep),
         "overrides": {k: str(v) for k, v in dict(overrides or {}).items()}}, indent=1))
    tokenizers: dict[str, pathlib.Path] = {}  # data section (as JSON) -> a trained tokenizer
    done = []
    for index, (name, config) in enumerate(configs.items()):
        point_dir = root / name
        data_key = config.data.to_json(sort_keys=True)
        if not config.data.tokenizer and data_key in tokenizers:
            config.data.tokenizer = str(tokenizers[data_key])
        if finished(point_dir, config.train.steps):
            log(f"[{index + 1}/{len(configs)}] {name}: finished earlier, kept")
        else:
            log(f"[{index + 1}/{len(configs)}] {name} -> {point_dir}")
            result = trainer.run(config, point_dir, **run_kwargs)
            if result.status != "done":
                log(f"{name}: {result.status} at step {result.step}; rerun to resume the sweep")
                return done
        if (point_dir / TOKENIZER_FILE).is_file():
            tokenizers.setdefault(data_key, point_dir / TOKENIZER_FILE)
        done.append(point_dir)
    return done
