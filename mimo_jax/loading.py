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
from mimo_jax.train.checkpoint import EXPORT_DIR, load_exported


class CheckpointNotFound(ValueError):
    """A checkpoint path that holds no usable model; the message says what was looked for."""


def load_checkpoint(path: str | pathlib.Path,
                    **overrides: Any) -> tuple[MiMoV2Flash, Any, TextTokenizer]:
    """(model, params, tokenizer) of a pretraining workdir or of its `export/` directory.

    `overrides` replace runtime fields of the saved `ModelConfig` (e.g. `dtype="bfloat16"`,
    `moe_impl="dense"`, `attention_impl="chunked"`); the parameters are read as saved.
    Raises `CheckpointNotFound` naming the path when it holds no params export, and `ConfigError`
    naming an override with a bad value.
    """
    directory = pathlib.Path(path)
    for candidate in (directory, directory / EXPORT_DIR):
        if (candidate / "model_config.json").is_file():
            config, params = load_exported(candidate)
            if overrides:
                config = with_runtime(config, **overrides)
            tokenizer_dir = candidate if (candidate / "tokenizer.json").is_file() else directory
            return MiMoV2Flash(config), params, load_tokenizer(tokenizer_dir)
    raise CheckpointNotFound(
        f"checkpoint {str(path)!r} has no params export (looked for model_config.json in it and "
        f"in {EXPORT_DIR}/); train with --config.train.export_params=True")
