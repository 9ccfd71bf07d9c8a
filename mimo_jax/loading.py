"""A trained model for inference, with its tokenizer, from a pretraining run.

    model, params, tokenizer = load_checkpoint("runs/tiny")          # the workdir
    model, params, tokenizer = load_checkpoint("runs/tiny/export", moe_impl="dense")

A Hugging Face directory loads with `mimo_jax.convert.hf.load` (`mimo_jax.load_hf`).
"""

from __future__ import annotations

import pathlib
from typing import Any

from mimo_jax.config import with_runtime
from mimo_jax.data.tokenizer import TextTokenizer, load_tokenizer
from mimo_jax.model.transformer import MiMoV2Flash
from mimo_jax.parallel import Parallelism
from mimo_jax.train.checkpoint import EXPORT_DIR, load_exported, read_exported_config


class CheckpointNotFound(ValueError):
    """A checkpoint path that holds no usable model; the message says what was looked for."""


def load_checkpoint(path: str | pathlib.Path, parallelism: Parallelism | None = None,
                    **overrides: Any) -> tuple[MiMoV2Flash, Any, TextTokenizer]:
    """(model, params, tokenizer) of a pretraining workdir, its `export/` directory, or a params
    export (e.g. a converted Hugging Face checkpoint, `python -m mimo_jax.convert.to_orbax`).

    `overrides` replace runtime fields of the saved `ModelConfig` (e.g. `dtype="bfloat16"`,
    `moe_impl="dense"`, `attention_impl="chunked"`); the parameters are read as saved, into
    their shardings on `parallelism`'s mesh when one is given (each host reads its shards
    only; what `generate` on a mesh needs for a model no host could hold whole).
    Raises `CheckpointNotFound` naming the path when it holds no params export, and `ConfigError`
    naming an override with a bad value.
    """
    directory = pathlib.Path(path)
    for candidate in (directory, directory / EXPORT_DIR):
        if (candidate / "model_config.json").is_file():
            config = read_exported_config(candidate)
            if overrides:
                config = with_runtime(config, **overrides)
            shardings = None
            if parallelism is not None:
                _, shardings = parallelism.param_shardings(MiMoV2Flash(config))
            _, params = load_exported(candidate, shardings)
            tokenizer_dir = candidate if (candidate / "tokenizer.json").is_file() else directory
            return MiMoV2Flash(config), params, load_tokenizer(tokenizer_dir)
    raise CheckpointNotFound(
        f"checkpoint {str(path)!r} has no params export (looked for model_config.json in it and "
        f"in {EXPORT_DIR}/); train with --config.train.export_params=True")
