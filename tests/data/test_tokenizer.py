"""Tokenizer: byte-level BPE training, round trips, tokenizer.json loading, errors."""

import pickle

import numpy as np
import pytest

from mimo_jax.data import tokenizer as tokenizer_lib
from mimo_jax.data.errors import DataError


def test_trained_bpe_round_trips_any_text(tokenizer):
    assert tokenizer.vocab_size == 300
    assert (tokenizer.pad_id, tokenizer.eos_id) == (0, 1)
    # Byte-level: text never seen in training (other scripts, emoji, control bytes) survives.
    for text in ("def alpha(self):\n    return x", "naïve 東京 🙂 \t\x00 end", ""):
        ids = tokenizer.encode(text)
        assert ids.dtype == np.int32 and np.all(ids < tokenizer.vocab_size)
        assert tokenizer.decode(ids) == text
    # Merges were learned: a frequent word (with its leading space) takes fewer tokens than bytes.
    assert tokenizer.encode(" return").size < len(" return")


def test_save_load_and_pickle_keep_ids(tokenizer, tmp_path):
    tokenizer.save(tmp_path / "tokenizer.json")
    loaded = tokenizer_lib.load_tokenizer(tmp_path)
    assert loaded.fingerprint() == tokenizer.fingerprint()
    text = "for x in range(alpha): beta = gamma"
    np.testing.assert_array_equal(loaded.encode(text), tokenizer.encode(text))
    clone = pickle.loads(pickle.dumps(tokenizer))  # how Grain ships it to worker processes
    np.testing.assert_array_equal(clone.encode(text), tokenizer.encode(text))


def test_training_is_deterministic(text_dir):
    texts = [p.read_text() for p in sorted(text_dir.glob("*.txt"))]
    first = tokenizer_lib.train_bpe(iter(texts), 280, 200_000)
    second = tokenizer_lib.train_bpe(iter(texts), 280, 200_000)
    assert first.fingerprint() == second.fingerprint()


def test_bad_tokenizer_inputs(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        tokenizer_lib.load_tokenizer(tmp_path / "missing.json")
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(DataError, match="not a valid tokenizer.json"):
        tokenizer_lib.load_tokenizer(tmp_path / "broken.json")
    with pytest.raises(DataError, match="too small"):
        tokenizer_lib.train_bpe(iter(["abc"]), 100, 1000)
    with pytest.raises(DataError, match="no text"):
        tokenizer_lib.train_bpe(iter([]), 300, 1000)
