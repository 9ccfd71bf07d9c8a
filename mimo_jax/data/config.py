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

from mimo_jax.config_reader import Section, at_least, fail, one_of, option, read_section

SOURCE_KINDS = ("stdlib", "text", "jsonl", "array_record", "seqio")
TEXT_DOCUMENT_UNITS = ("file", "line")
# Kinds that read a held-out split of the same files instead of separate evaluation files.
SPLIT_KINDS = ("stdlib",)


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
                fail(key, spec, f"weight {weight_text!r} is not a number")
            if not weight > 0:
                fail(key, spec, f"weight {weight_text!r} must be > 0")
        kind, _, arg = entry.partition(":")
        kind = kind.strip()
        if kind not in SOURCE_KINDS:
            fail(key, spec, f"source kind {kind!r} is not one of {SOURCE_KINDS}")
        if kind != "stdlib" and not arg:
            fail(key, spec, f"source kind {kind!r} needs an argument, e.g. '{kind}:PATH'")
        out.append(SourceSpec(kind=kind, arg=arg.strip(), weight=weight))
    return tuple(out)


def _sources(value: Any, key: str) -> tuple[SourceSpec, ...]:
    if value is None:
        return ()
    if not isinstance(value, str):
        fail(key, value, "must be a 'KIND[:ARG][@WEIGHT],...' string")
    return parse_sources(value, key)


def format_sources(sources: tuple[SourceSpec, ...]) -> str:
    """The inverse of `parse_sources` (weights written exactly)."""
    return ",".join(f"{s.kind}{':' + s.arg if s.arg else ''}@{s.weight!r}" for s in sources)


def _some_source(sources: tuple[SourceSpec, ...]) -> str | None:
    return None if sources else "needs at least one source, e.g. 'stdlib'"


def _percent(value: float) -> str | None:
    return None if 0.0 < value < 100.0 else "must be in (0, 100)"


@dataclasses.dataclass(frozen=True, kw_only=True)
class DataConfig(Section):
    """The input pipeline.

    `batch_size` is global (all processes together); each process reads `batch_size /
    process_count` rows of `seq_len` tokens per step.
    """

    SECTION = "data"

    train_sources: tuple[SourceSpec, ...] = option(check=_some_source, parse=_sources,
                                                   dump=format_sources)
    # () = the held-out split of the train sources that have one.
    eval_sources: tuple[SourceSpec, ...] = option((), parse=_sources, dump=format_sources)
    seq_len: int = option(check=at_least(2, "a token and its target"))
    batch_size: int = option(check=at_least(1))
    eval_batches: int = option(8, check=at_least(0))
    eval_percent: float = option(5.0, check=_percent)  # share of the stdlib corpus held out
    tokenizer: str = option("")  # path to a Hugging Face tokenizer.json; "" = train a BPE
    tokenizer_train_bytes: int = option(8_000_000, check=at_least(1))  # corpus bytes for the BPE
    add_eos: bool = option(True)
    text_document: str = option("file", check=one_of(TEXT_DOCUMENT_UNITS))
    # Cut text files into pieces of whole lines up to this size; 0 = off.
    max_document_bytes: int = option(0, check=at_least(0, "0 = off"))
    jsonl_field: str = option("text")
    seqio_split: str = option("train")
    seqio_eval_split: str = option("validation")
    seqio_feature: str = option("targets")
    shuffle: bool = option(True)
    seed: int = option(0)
    num_workers: int = option(0, check=at_least(0))
    worker_buffer_size: int = option(16, check=at_least(1))


def data_config_from_dict(cfg: Mapping[str, Any]) -> DataConfig:
    """Builds and validates a `DataConfig` from the `data` section of a run config."""
    return read_section(DataConfig, cfg)
