"""The generate command's checkpoint loading: a trainer export, found from the workdir."""

import jax
import numpy as np
import pytest

from mimo_jax.data.tokenizer import train_bpe
from mimo_jax.loading import CheckpointNotFound, load_checkpoint
from mimo_jax.train.checkpoint import EXPORT_DIR, export_params


def test_load_checkpoint_reads_the_trainer_export(decode_model, tmp_path):
    model, params = decode_model
    tokenizer = train_bpe(["def f(x):\n    return x + 1\n"] * 20, vocab_size=300,
                          max_bytes=10_000)
    tokenizer.save(tmp_path / "tokenizer.json")
    export_params(tmp_path / EXPORT_DIR, params, model.config, tmp_path / "tokenizer.json")
    for directory in (tmp_path, tmp_path / EXPORT_DIR):
        loaded, loaded_params, loaded_tokenizer = load_checkpoint(str(directory))
        assert loaded.config == model.config
        for a, b in zip(jax.tree.leaves(loaded_params), jax.tree.leaves(params)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        assert loaded_tokenizer.decode(loaded_tokenizer.encode("return x")) == "return x"


def test_load_checkpoint_names_a_directory_without_export(tmp_path):
    with pytest.raises(CheckpointNotFound, match=str(tmp_path)):
        load_checkpoint(str(tmp_path))
