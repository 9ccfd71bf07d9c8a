"""Shared fixtures of the data tests: a small corpus on disk and a tokenizer trained on it."""

import pathlib

import numpy as np
import pytest

from mimo_jax.data import tokenizer as tokenizer_lib

WORDS = ("alpha", "beta", "gamma", "delta", "def", "return", "class", "import", "self", "x",
         "(", ")", ":", "=", "+", "\n", "    ", "if", "else", "for", "in", "range")


def random_text(rng: np.random.Generator, words: int) -> str:
    return " ".join(rng.choice(WORDS, size=words))


@pytest.fixture(scope="session", name="text_dir")
def fixture_text_dir(tmp_path_factory) -> pathlib.Path:
    """40 text files of 20..400 words, plus one empty file that must be skipped."""
    rng = np.random.default_rng(1)
    directory = tmp_path_factory.mktemp("text")
    for i in range(40):
        (directory / f"doc{i:02d}.txt").write_text(random_text(rng, int(rng.integers(20, 400))))
    (directory / "empty.txt").write_text("")
    return directory


@pytest.fixture(scope="session", name="tokenizer")
def fixture_tokenizer(text_dir) -> tokenizer_lib.TextTokenizer:
    texts = (p.read_text() for p in sorted(text_dir.glob("*.txt")))
    return tokenizer_lib.train_bpe(texts, vocab_size=300, max_bytes=1_000_000)
