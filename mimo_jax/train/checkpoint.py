"""Checkpoints: Orbax `CheckpointManager` with async saves, exact resume and a params-only export.

A checkpoint at step N holds three items:
  state  the `TrainState` (params with the router biases, optimizer state, step, RNG key)
  data   the Grain iterator state after the N-th batch, as JSON
  meta   what the checkpoint was written for: the model architecture, the tokenizer fingerprint,
         the settings that shape the data stream (its saved position means nothing in another)
Orbax writes each step into a temporary directory and renames it when complete, so a checkpoint
half-written when the process died is never listed; `cleanup_tmp_directories` removes the debris on
the next start, and the run resumes from the last complete step.
"""

from __future__ import annotations

import json
import pathlib
import shutil
from typing import Any

import jax
import orbax.checkpoint as ocp

from mimo_jax.config import (RUNTIME_KEYS, ModelConfig, architecture, model_config_from_dict,
                             model_config_to_dict)
from mimo_jax.model.transformer import MiMoV2Flash, init_params
from mimo_jax.train.config import TrainConfig

CHECKPOINT_DIR = "checkpoints"
EXPORT_DIR = "export"

__all__ = ["CHECKPOINT_DIR", "EXPORT_DIR", "CheckpointError", "Checkpointer", "architecture",
           "export_params", "load_exported", "mismatch"]


class CheckpointError(ValueError):
    """A checkpoint that cannot be used by this run; the message names it and why."""


def _flatten(tree: dict[str, Any], prefix: str) -> dict[str, Any]:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}.{key}"))
        else:
            out[f"{prefix}.{key}"] = list(value) if isinstance(value, tuple) else value
    return out


def mismatch(saved: dict[str, Any], current: dict[str, Any], prefix: str) -> list[str]:
    """'PREFIX.KEY: checkpoint=A run=B' for each (nested) field that differs."""
    a, b = _flatten(saved, prefix), _flatten(current, prefix)
    return [f"{key}: checkpoint={a.get(key)!r} run={b.get(key)!r}"
            for key in sorted(set(a) | set(b)) if a.get(key) != b.get(key)]


class Checkpointer:
    """Saves and restores the run's checkpoints under `<workdir>/checkpoints`."""

    def __init__(self, workdir: str | pathlib.Path, config: TrainConfig):
        self.directory = pathlib.Path(workdir).absolute() / CHECKPOINT_DIR
        options = ocp.CheckpointManagerOptions(
            max_to_keep=config.keep_last, keep_period=config.keep_every or None,
            enable_async_checkpointing=config.async_checkpoint, create=True,
            cleanup_tmp_directories=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options,
                                             item_names=("state", "data", "meta"))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, data_state: Any, meta: dict[str, Any]) -> None:
        """Starts saving (async when configured); returns once the arrays are copied off device."""
        self.manager.save(step, force=True, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=ocp.args.JsonSave(data_state),
            meta=ocp.args.JsonSave(meta)))

    def read_meta(self, step: int) -> dict[str, Any]:
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(
                meta=ocp.args.JsonRestore()))
        except Exception as err:  # orbax raises several types for unreadable directories
            raise CheckpointError(f"checkpoint {self.directory / str(step)} cannot be read: "
                                  f"{type(err).__name__}: {err}") from err
        return restored.meta

    def check(self, step: int, meta: dict[str, Any]) -> None:
        """Raises `CheckpointError` unless checkpoint `step` was written for this model/tokenizer."""
        saved = self.read_meta(step)
        where = self.directory / str(step)
        diff = mismatch(saved.get("architecture", {}), meta["architecture"], "model")
        if diff:
            raise CheckpointError(f"checkpoint {where} is for a different model config: "
                                  + "; ".join(diff[:6]) + ("; ..." if len(diff) > 6 else "")
                                  + " (use another --workdir, or the checkpoint's config)")
        if saved.get("tokenizer") != meta.get("tokenizer"):
            raise CheckpointError(f"checkpoint {where} was trained with tokenizer "
                                  f"{saved.get('tokenizer')!r}, this run has "
                                  f"{meta.get('tokenizer')!r}")
        changed = mismatch(saved.get("data_stream", {}), meta.get("data_stream", {}), "data")
        if changed:
            raise CheckpointError(f"checkpoint {where} saved the position of a different data "
                                  "stream, so it cannot resume this one: " + "; ".join(changed)
                                  + " (restore those values, or train in a new --workdir)")

    def _restore(self, step: int, **items: Any) -> Any:
        try:
            return self.manager.restore(step, args=ocp.args.Composite(**items))
        except Exception as err:  # orbax raises several types for damaged checkpoints
            raise CheckpointError(f"checkpoint {self.directory / str(step)} cannot be restored: "
                                  f"{type(err).__name__}: {err}") from err

    def restore_data_state(self, step: int) -> Any:
        """The Grain iterator state saved with `step`."""
        return self._restore(step, data=ocp.args.JsonRestore()).data

    def restore_state(self, step: int, abstract_state: Any) -> Any:
        """The train state of `step`, laid out as `abstract_state` (shapes, dtypes, shardings)."""
        return self._restore(step, state=ocp.args.StandardRestore(abstract_state)).state

    def wait(self) -> None:
        """Blocks until every pending async save is on disk."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def export_params(directory: str | pathlib.Path, params: Any, model_config: ModelConfig,
                  tokenizer_file: str | pathlib.Path | None = None) -> pathlib.Path:
    """Writes params only (no optimizer state) plus model_config.json for inference.

    Layout: <directory>/params (an Orbax PyTree checkpoint), model_config.json, tokenizer.json.
    """
    directory = pathlib.Path(directory).absolute()
    if directory.exists():
        shutil.rmtree(directory)
    directory.mkdir(parents=True)
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(directory / "params", params)
    (directory / "model_config.json").write_text(
        json.dumps(model_config_to_dict(model_config), indent=2))
    if tokenizer_file is not None and pathlib.Path(tokenizer_file).is_file():
        shutil.copy(tokenizer_file, directory / "tokenizer.json")
    return directory


def read_exported_config(directory: str | pathlib.Path) -> ModelConfig:
    """The model config saved in an `export_params` directory (nothing else is read)."""
    config_file = pathlib.Path(directory).absolute() / "model_config.json"
    if not config_file.is_file():
        raise CheckpointError(f"{config_file.parent} is not a params export (no "
                              "model_config.json)")
    raw = json.loads(config_file.read_text())
    # Exports written before the runtime choices had a section of their own kept them flat.
    flat = {key: raw.pop(key) for key in RUNTIME_KEYS if key in raw}
    if flat:
        raw["runtime"] = {**raw.get("runtime", {}), **flat}
    return model_config_from_dict(raw)


def load_exported(directory: str | pathlib.Path,
                  shardings: Any = None) -> tuple[ModelConfig, Any]:
    """(model config, params) from an `export_params` directory (or a converted Hugging Face
    checkpoint, `mimo_jax.convert.to_orbax`): on the default device, or with `shardings` (a
    params-shaped tree of `jax.sharding.Sharding`) each array restored straight into its
    sharding, each host reading only what its shards hold."""
    directory = pathlib.Path(directory).absolute()
    config = read_exported_config(directory)
    abstract = jax.eval_shape(lambda: init_params(MiMoV2Flash(config), jax.random.PRNGKey(0)))
    if shardings is not None:
        abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                abstract, shardings)
    with ocp.StandardCheckpointer() as checkpointer:
        params = checkpointer.restore(directory / "params", abstract)
    return config, params
