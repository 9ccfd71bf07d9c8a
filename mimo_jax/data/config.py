"""Frozen, validated configuration of the input pipeline (the `data` section of a run config).

A data source is written as a short string so that a mixture can be set from the command line:

    KIND[:ARG][@WEIGHT], ...      e.g.  "text:/corpus/*.txt@0.7,array_record:/shards@0.3"

  stdlib                 the embedded corpus: the Python standard library's .py files (`corpus.py`)
  text:GLOB              plain-text files; one document per file or per line (`data.text_document`)
  jsonl:GLOB             JSON-lines files; one document per line, text under `data.jsonl_field`
  array_record:PATH      ArrayRecord shards of token ids written by `mimo_jax.data.to_array_record`
                         (a directory holding them, or a glob of shard files)
  seqio:NAME             a registered seqio Task or Mixture (needs the `seqio` extra)

Weights are relative (they need not sum to one); a missing weight is 1.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from mimo_jax.config import ConfigError

SOURCE_KINDS = ("stdlib", "text", "jsonl", "array_record", "seqio")
TEXT_DOCUMENT_UNITS = ("file", "line")
# Kinds that read a held-out split of the same files instead of separate evaluation files.
SPLIT_KINDS = ("stdlib",)


def _fail(key: str, value: Any, why: str) -> None:
    raise ConfigError(f"config key {key!r} = {value!r}: {why}")


@dataclasses.dataclass(frozen=True)
class SourceSpec:
    """One entry of a mixture: what to read, and its relative sampling weight."""

    kind: str
    arg: str
    weight: float

    def __str__(self) -> str:
        return f"{self.kind}{':' + self.arg if self.arg else ''}@{self.weight:g}"


def parse_sources(spec: str, key: str) -> tuple[SourceSpec, ...]:
    """Parses "KIND[:ARG][@WEIGHT],..." into `SourceSpec`s; an empty string gives ()."""
    out = []
    for entry in (e.strip() for e in spec.split(",")):
        if not entry:
            continue
        weight = 1.0
        if "@" in entry:
            entry, _, weight_text = entry.rpartition("@")
            try:
                weight = float(weight_text)
            except ValueError:
                _fail(key, spec, f"weight {weight_text!r} is not a number")
            if not weight > 0:
                _fail(key, spec, f"weight {weight_text!r} must be > 0")
        kind, _, arg = entry.partition(":")
        kind = kind.strip()
        if kind not in SOURCE_KINDS:
            _fail(key, spec, f"source kind {kind!r} is not one of {SOURCE_KINDS}")
        if kind != "stdlib" and not arg:
            _fail(key, spec, f"source kind {kind!r} needs an argument, e.g. '{kind}:PATH'")
        out.append(SourceSpec(kind=kind, arg=arg.strip(), weight=weight))
    return tuple(out)


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """The input pipeline.

    `batch_size` is global (all processes together); each process reads `batch_size /
    process_count` rows of `seq_len` tokens per step.
    """

    train_sources: tuple[SourceSpec, ...]
    eval_sources: tuple[SourceSpec, ...]
    seq_len: int
    batch_size: int
    eval_batches: int
    eval_percent: float  # share of the stdlib corpus held out for evaluation
    tokenizer: str  # path to a Hugging Face tokenizer.json; "" = train a byte-level BPE
    tokenizer_train_bytes: int  # corpus bytes used to train the BPE
    add_eos: bool
    text_document: str
    max_document_bytes: int  # cut text files into pieces of whole lines up to this size; 0 = off
    jsonl_field: str
    seqio_split: str
    seqio_eval_split: str
    seqio_feature: str
    shuffle: bool
    seed: int
    num_workers: int
    worker_buffer_size: int

    def validate(self) -> "DataConfig":
        if not self.train_sources:
            _fail("data.train_sources", "", "needs at least one source, e.g. 'stdlib'")
        for name in ("seq_len", "batch_size"):
            if getattr(self, name) < 1:
                _fail(f"data.{name}", getattr(self, name), "must be >= 1")
        if self.seq_len < 2:
            _fail("data.seq_len", self.seq_len, "must be >= 2 (a token and its target)")
        if self.eval_batches < 0:
            _fail("data.eval_batches", self.eval_batches, "must be >= 0")
        if not 0.0 < self.eval_percent < 100.0:
            _fail("data.eval_percent", self.eval_percent, "must be in (0, 100)")
        if self.tokenizer_train_bytes < 1:
            _fail("data.tokenizer_train_bytes", self.tokenizer_train_bytes, "must be >= 1")
        if self.text_document not in TEXT_DOCUMENT_UNITS:
            _fail("data.text_document", self.text_document, f"must be one of {TEXT_DOCUMENT_UNITS}")
        if self.max_document_bytes < 0:
            _fail("data.max_document_bytes", self.max_document_bytes, "must be >= 0 (0 = off)")
        if self.num_workers < 0:
            _fail("data.num_workers", self.num_workers, "must be >= 0")
        if self.worker_buffer_size < 1:
            _fail("data.worker_buffer_size", self.worker_buffer_size, "must be >= 1")
        return self


_DEFAULTS: dict[str, Any] = dict(
    eval_sources="", eval_batches=8, eval_percent=5.0, tokenizer="",
    tokenizer_train_bytes=8_000_000, add_eos=True, text_document="file", max_document_bytes=0,
    jsonl_field="text", seqio_split="train", seqio_eval_split="validation", seqio_feature="targets", shuffle=True,
    seed=0, num_workers=0, worker_buffer_size=16)


def data_config_from_dict(cfg: Mapping[str, Any]) -> DataConfig:
    """Builds and validates a `DataConfig` from the `data` section of a run config."""
    known = {f.name for f in dataclasses.fields(DataConfig)}
    for key in cfg.keys():
        if key not in known:
            raise ConfigError(f"config key 'data.{key}' is unknown; known keys: {sorted(known)}")
    values = dict(_DEFAULTS)
    values.update(dict(cfg))
    for key in ("train_sources", "seq_len", "batch_size"):
        if key not in values:
            raise ConfigError(f"config key 'data.{key}' is missing")
    return DataConfig(
        train_sources=parse_sources(str(values["train_sources"]), "data.train_sources"),
        eval_sources=parse_sources(str(values["eval_sources"] or ""), "data.eval_sources"),
        seq_len=int(values["seq_len"]),
        batch_size=int(values["batch_size"]),
        eval_batches=int(values["eval_batches"]),
        eval_percent=float(values["eval_percent"]),
        tokenizer=str(values["tokenizer"] or ""),
        tokenizer_train_bytes=int(values["tokenizer_train_bytes"]),
        add_eos=bool(values["add_eos"]),
        text_document=str(values["text_document"]),
        max_document_bytes=int(values["max_document_bytes"]),
        jsonl_field=str(values["jsonl_field"]),
        seqio_split=str(values["seqio_split"]),
        seqio_eval_split=str(values["seqio_eval_split"]),
        seqio_feature=str(values["seqio_feature"]),
        shuffle=bool(values["shuffle"]),
        seed=int(values["seed"]),
        num_workers=int(values["num_workers"]),
        worker_buffer_size=int(values["worker_buffer_size"]),
    ).validate()
