"""Text <-> token ids: a Hugging Face `tokenizer.json`, or a byte-level BPE trained on the corpus.

A trained tokenizer is saved with the run (`<workdir>/tokenizer.json`) so that a resumed run, an
evaluation or a decoder reads exactly the ids the model was trained on.
"""

from __future__ import annotations

import hashlib
import json
import pathlib
from typing import Iterable, Iterator

import numpy as np
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from mimo_jax.data.errors import DataError

PAD_TOKEN = "<|pad|>"
EOS_TOKEN = "<|endoftext|>"
# End-of-text spellings of common tokenizers, tried in order when loading a tokenizer.json.
_EOS_CANDIDATES = (EOS_TOKEN, "</s>", "<eos>", "<|end_of_text|>", "<|im_end|>", "<|eot_id|>")
_PAD_CANDIDATES = (PAD_TOKEN, "<pad>", "[PAD]", "<|padding|>")


class TextTokenizer:
    """A `tokenizers.Tokenizer` with the ids the pipeline needs (end-of-text and padding)."""

    def __init__(self, tokenizer: tokenizers.Tokenizer, source: str):
        self._tokenizer = tokenizer
        self.source = source
        vocab = tokenizer.get_vocab(with_added_tokens=True)
        self.eos_id: int | None = next((vocab[t] for t in _EOS_CANDIDATES if t in vocab), None)
        pad = next((vocab[t] for t in _PAD_CANDIDATES if t in vocab), None)
        # Padding positions are masked by segment id 0, so any id works; 0 keeps them obvious.
        self.pad_id: int = 0 if pad is None else pad

    @property
    def vocab_size(self) -> int:
        """One more than the largest id the tokenizer can produce."""
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> np.ndarray:
        """[L] int32 ids of `text` (no special tokens added)."""
        return np.asarray(self._tokenizer.encode(text, add_special_tokens=False).ids, np.int32)

    def decode(self, ids: Iterable[int]) -> str:
        return self._tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)

    def to_json(self) -> str:
        return self._tokenizer.to_str()

    def fingerprint(self) -> str:
        """sha256 of the serialised tokenizer: two runs agree on ids iff this agrees."""
        return hashlib.sha256(self.to_json().encode("utf-8")).hexdigest()

    def save(self, path: str | pathlib.Path) -> None:
        """Writes the tokenizer as `tokenizer.json` (atomically: no half-written file is left)."""
        path = pathlib.Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(self.to_json(), encoding="utf-8")
        tmp.replace(path)

    def __getstate__(self) -> dict:
        # Worker processes receive the tokenizer by pickling; its JSON form is the portable one.
        return {"json": self.to_json(), "source": self.source}

    def __setstate__(self, state: dict) -> None:
        self.__init__(tokenizers.Tokenizer.from_str(state["json"]), state["source"])


def load_tokenizer(path: str | pathlib.Path) -> TextTokenizer:
    """Loads a Hugging Face `tokenizer.json` (or a directory holding one)."""
    path = pathlib.Path(path)
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.is_file():
        raise DataError(f"tokenizer file {str(path)!r} does not exist")
    try:
        tokenizer = tokenizers.Tokenizer.from_file(str(path))
    except Exception as err:  # tokenizers raises a bare Exception on malformed JSON
        raise DataError(f"tokenizer file {str(path)!r} is not a valid tokenizer.json: {err}") from err
    return TextTokenizer(tokenizer, source=str(path))


def train_bpe(texts: Iterable[str], vocab_size: int, max_bytes: int) -> TextTokenizer:
    """Trains a byte-level BPE (GPT-2 style pre-tokenisation) on at most `max_bytes` of text.

    Ids 0 and 1 are the padding and end-of-text tokens. Byte-level means every string encodes:
    the 256 byte symbols are in the vocabulary from the start.
    """
    minimum = 256 + 2
    if vocab_size < minimum:
        raise DataError(f"vocab_size={vocab_size} is too small for a byte-level BPE "
                        f"(needs >= {minimum}: 256 bytes + 2 special tokens)")
    tokenizer = tokenizers.Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[PAD_TOKEN, EOS_TOKEN], min_frequency=2,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    seen = {"bytes": 0, "docs": 0}

    def limited() -> Iterator[str]:
        for text in texts:
            if seen["bytes"] >= max_bytes:
                return
            text = text[: max_bytes - seen["bytes"]]
            seen["bytes"] += len(text)
            seen["docs"] += 1
            yield text

    tokenizer.train_from_iterator(limited(), trainer)
    if seen["bytes"] == 0:
        raise DataError("cannot train a tokenizer: the training corpus has no text")
    return TextTokenizer(tokenizer, source=f"byte-level BPE trained on {seen['docs']} documents "
                                           f"({seen['bytes']:,} characters)")


def describe(tokenizer: TextTokenizer) -> str:
    """One line for logs: where the tokenizer came from and its special ids."""
    return json.dumps({"source": tokenizer.source, "vocab_size": tokenizer.vocab_size,
                       "eos_id": tokenizer.eos_id, "pad_id": tokenizer.pad_id})
