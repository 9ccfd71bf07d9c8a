"""The supervised fine-tuning data path: JSON-lines (prompt, response) pairs -> packed rows.

An example is `prompt ids ++ response ids ++ [end-of-text]`, prompt and response tokenised apart
(so the boundary is where a decoder starts generating). Its `loss_mask` is aligned with `tokens`:
1 on the tokens that are targets of the loss, exactly the response's tokens and the end-of-text,
except a token that opens the example (with an empty prompt nothing predicts it).

Examples are packed whole into rows of `seq_len` (Grain's first-fit packing with one bin, so in
order): a row takes examples until the next one does not fit; that one opens the next row. An
example longer than a row is dropped and counted (or raises, `too_long="error"`). Rows carry
the pretraining keys plus the mask, each numpy int32 [T]:
  tokens       token ids; the pad id on padding
  segment_ids  1, 2, ... per example in the row; 0 on padding
  positions    0, 1, ... within each example; 0 on padding
  loss_mask    1 on response targets (see above); 0 elsewhere and on padding
Every stage is a Grain dataset whose iterator has get_state/set_state, so resume is exact.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any, Sequence

import grain
import numpy as np

from mimo_jax.data.errors import DataError
from mimo_jax.data.pipeline import ProcessShard
from mimo_jax.data.sources import TextDocuments, expand_paths
from mimo_jax.data.tokenizer import TextTokenizer

FIELDS = ("prompt", "response")
SFT_KEYS = ("tokens", "segment_ids", "positions", "loss_mask")
TOO_LONG = ("drop", "error")
DROPPED_KEY = "too_long_dropped"


class SftRecords(TextDocuments):
    """Random-access (prompt, response) records, one per non-blank line of JSON-lines files.

    Every file must hold at least one record. A bad line raises `DataError` naming its file and
    line number when it is read. A subclass reads other string fields by setting `FIELDS` (and
    `KIND`, the files' name in messages).
    """

    FIELDS: tuple[str, ...] = FIELDS
    KIND = "SFT"

    def __init__(self, paths: Sequence[str | os.PathLike], name: str = ""):
        super().__init__(paths, unit="line", name=name)
        empty = sorted(set(range(len(self._paths))) - set(self._files.tolist()))
        if empty:
            raise DataError(f"{self.KIND} file {self._paths[empty[0]]!r} holds no examples "
                            "(it is empty)")

    def _where(self, index: int) -> str:
        path = self._paths[self._files[index]]
        with open(path, "rb") as f:
            line = f.read(int(self._offsets[index])).count(b"\n") + 1
        return f"{self.KIND} file {path!r} line {line}"

    def __getitem__(self, index: int) -> dict[str, str]:
        raw = self._read(index)
        try:
            record = json.loads(raw)
        except json.JSONDecodeError as err:
            raise DataError(f"{self._where(index)} is not JSON: {err}") from err
        if not isinstance(record, dict):
            raise DataError(f"{self._where(index)} is a JSON {type(record).__name__}, not an "
                            f"object with fields {self.FIELDS}")
        for field in self.FIELDS:
            if field not in record:
                raise DataError(f"{self._where(index)} has no field {field!r}")
            if not isinstance(record[field], str):
                raise DataError(f"{self._where(index)}: field {field!r} is "
                                f"{type(record[field]).__name__}, not a string")
        return {field: record[field] for field in self.FIELDS}


def open_sft_records(pattern: str) -> SftRecords:
    """The SFT records of every file matching a glob or under a directory."""
    return SftRecords(expand_paths(pattern, "SFT data"), name=pattern)


def tokenize_example(tokenizer: TextTokenizer, prompt: str, response: str,
                     add_eos: bool = True) -> dict[str, np.ndarray]:
    """One example's `tokens` [L] and `loss_mask` [L] (int32), as in the module docstring."""
    prompt_ids = tokenizer.encode(prompt)
    response_ids = tokenizer.encode(response)
    if add_eos:
        if tokenizer.eos_id is None:
            raise DataError(f"tokenizer {tokenizer.source!r} has no end-of-text token to end "
                            "SFT responses with")
        response_ids = np.append(response_ids, np.int32(tokenizer.eos_id))
    tokens = np.concatenate([prompt_ids, response_ids]).astype(np.int32)
    loss_mask = np.zeros(tokens.size, np.int32)
    loss_mask[prompt_ids.size:] = 1
    loss_mask[:1] = 0  # the first token of an example is nobody's target
    return {"tokens": tokens, "loss_mask": loss_mask}


class TokenizeExamples(grain.transforms.Map):
    """{"prompt", "response"} -> {"tokens", "loss_mask"} with `tokenize_example`."""

    def __init__(self, tokenizer: TextTokenizer, add_eos: bool = True):
        self._tokenizer = tokenizer
        self._add_eos = add_eos

    def map(self, element: dict[str, str]) -> dict[str, np.ndarray]:
        return tokenize_example(self._tokenizer, element["prompt"], element["response"],
                                self._add_eos)


class DropLongExamples(grain.IterDataset):
    """Skips examples longer than `seq_len` (counted in the iterator state) or raises on them.

    Empty examples (no tokens) are skipped too; they carry no loss.
    """

    def __init__(self, parent: grain.IterDataset, seq_len: int, too_long: str = "drop"):
        super().__init__(parent)
        if too_long not in TOO_LONG:
            raise ValueError(f"too_long={too_long!r} is not one of {TOO_LONG}")
        self._seq_len = seq_len
        self._too_long = too_long

    def __iter__(self) -> "_DropLongIterator":
        return _DropLongIterator(self._parent.__iter__(), self._seq_len, self._too_long)


class _DropLongIterator(grain.DatasetIterator):
    """Iterator of `DropLongExamples`; its state is the parent's plus the drop count."""

    def __init__(self, parent: grain.DatasetIterator, seq_len: int, too_long: str):
        super().__init__(parent)
        self._seq_len = seq_len
        self._too_long = too_long
        self._dropped = 0

    def __next__(self) -> dict[str, np.ndarray]:
        while True:
            example = next(self._parent)
            length = example["tokens"].size
            if 0 < length <= self._seq_len:
                return example
            if length == 0:
                continue
            if self._too_long == "error":
                raise DataError(f"an SFT example of {length} tokens does not fit in a row of "
                                f"seq_len={self._seq_len} (too_long='drop' skips such examples)")
            self._dropped += 1
            logging.warning("dropped an SFT example of %d tokens (> seq_len=%d); %d so far",
                            length, self._seq_len, self._dropped)

    def get_state(self) -> dict[str, Any]:
        return {"parent": self._parent.get_state(), DROPPED_KEY: self._dropped}

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["parent"])
        self._dropped = int(state[DROPPED_KEY])


def dropped_examples(state: Any) -> int:
    """How many too-long examples an SFT iterator (at any wrapping depth) has dropped so far."""
    if isinstance(state, dict):
        if DROPPED_KEY in state:
            return int(state[DROPPED_KEY])
        return sum(dropped_examples(value) for value in state.values())
    return 0


def _row_keys(row: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {"tokens": row["tokens"], "segment_ids": row["tokens_segment_ids"],
            "positions": row["tokens_positions"], "loss_mask": row["loss_mask"]}


def pack_examples(examples: grain.IterDataset, seq_len: int, pad_id: int = 0,
                  too_long: str = "drop") -> grain.IterDataset:
    """Packs a stream of {"tokens", "loss_mask"} examples whole into rows with `SFT_KEYS`."""
    if seq_len < 1:
        raise ValueError(f"seq_len={seq_len} must be >= 1")
    fitting = DropLongExamples(examples, seq_len, too_long)
    packed = grain.experimental.FirstFitPackIterDataset(
        fitting, length_struct={"tokens": seq_len, "loss_mask": seq_len}, num_packing_bins=1,
        shuffle_bins=False, meta_features=("loss_mask",),
        padding_struct={"tokens": pad_id, "loss_mask": 0})
    return packed.map(_row_keys)


def sft_rows(records: SftRecords | Sequence[dict[str, str]], tokenizer: TextTokenizer,
             seq_len: int, *, seed: int = 0, shuffle: bool = True, num_epochs: int | None = None,
             add_eos: bool = True, too_long: str = "drop", shard: ProcessShard = ProcessShard()
             ) -> grain.IterDataset:
    """Packed rows of this process's slice of the records, shuffled per epoch.

    num_epochs None repeats forever (training); a number gives a finite stream whose last row
    is padded.
    """
    if len(records) < shard.count:
        raise DataError(f"SFT data has {len(records)} examples, fewer than the {shard.count} "
                        "processes that share it")
    dataset = grain.MapDataset.source(records)[shard.index::shard.count]
    if shuffle:
        dataset = dataset.shuffle(seed=seed)
    dataset = dataset.repeat(num_epochs).map(TokenizeExamples(tokenizer, add_eos))
    stream = dataset.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=32))
    return pack_examples(stream, seq_len, tokenizer.pad_id, too_long)


def sft_batches(records: SftRecords | Sequence[dict[str, str]], tokenizer: TextTokenizer,
                seq_len: int, batch_size: int, **options) -> grain.IterDataset:
    """`sft_rows` batched: dicts of int32 [B, T] arrays under `SFT_KEYS` (B the per-process
    batch); an incomplete last batch of a finite stream is dropped."""
    return sft_rows(records, tokenizer, seq_len, **options).batch(batch_size,
                                                                   drop_remainder=True)
