"""The input pipeline: sources -> token ids -> weighted mixture -> workers -> packing -> batches.

Batches are dicts of numpy int32 arrays, each [B, T] with B the per-process batch:
  tokens       token ids (the pad id on padding)
  segment_ids  1, 2, ... per packed document piece; 0 on padding
  positions    0, 1, ... within each piece; 0 on padding

Everything up to the mixture is a Grain `MapDataset` (random access), so shuffling is global and
a position in the stream is a small index; the packing and batching stages keep their own state.
`train_batches(...).__iter__()` gives an iterator whose `get_state()` / `set_state()` make a
resumed run read exactly the batches it would have read.

Multi-host: each process reads a disjoint 1/process_count slice of every source's documents and
packs its own rows; the trainer assembles the global batch from the per-process parts.
"""

from __future__ import annotations

import dataclasses
import logging
import pathlib
from typing import Iterator

import grain
import jax
import numpy as np

from mimo_jax.data import corpus, seqio_adapter
from mimo_jax.data import tokenizer as tokenizer_lib
from mimo_jax.data.config import DataConfig, SourceSpec
from mimo_jax.data.errors import DataError
from mimo_jax.data.packing import PackIterDataset
from mimo_jax.data.sources import JsonlDocuments, TextDocuments, TokenShards, expand_paths
from mimo_jax.data.sources import token_shard_paths

TEXT_KINDS = ("stdlib", "text", "jsonl")
TOKENIZER_FILE = "tokenizer.json"
BATCH_KEYS = ("tokens", "segment_ids", "positions")


@dataclasses.dataclass(frozen=True)
class ProcessShard:
    """Which slice of the data this process reads: documents `index`, `index + count`, ..."""

    index: int = 0
    count: int = 1

    @classmethod
    def from_jax(cls) -> "ProcessShard":
        return cls(jax.process_index(), jax.process_count())


@dataclasses.dataclass(frozen=True)
class OpenedSource:
    """A source ready for the pipeline: documents (str or int32 ids) with random access."""

    name: str
    kind: str
    documents: object  # a RandomAccessDataSource: __len__ and __getitem__
    weight: float
    vocab_size: int | None = None  # ids the source's own vocabulary can produce, when known
    tokenizer_dir: str | None = None  # where a pre-tokenised source keeps its tokenizer.json


def open_source(spec: SourceSpec, config: DataConfig, split: str) -> list[OpenedSource]:
    """Opens one configured source for "train" or "eval"; a seqio Mixture gives one per Task."""
    if spec.kind == "stdlib":
        files = corpus.stdlib_files(split, config.eval_percent)
        name = f"stdlib[{split}]"
        documents = TextDocuments(files, "file", name, config.max_document_bytes)
        return [OpenedSource(name, "stdlib", documents, spec.weight)]
    if spec.kind == "text":
        files = expand_paths(spec.arg, "text data")
        documents = TextDocuments(files, config.text_document, spec.arg,
                                  config.max_document_bytes)
        return [OpenedSource(spec.arg, "text", documents, spec.weight)]
    if spec.kind == "jsonl":
        files = expand_paths(spec.arg, "JSON-lines data")
        return [OpenedSource(spec.arg, "jsonl", JsonlDocuments(files, config.jsonl_field, spec.arg),
                             spec.weight)]
    if spec.kind == "array_record":
        files, metadata = token_shard_paths(spec.arg)
        shards = TokenShards(files, spec.arg)
        vocab = None if metadata is None else int(metadata["vocab_size"])
        tokenizer_dir = str(pathlib.Path(files[0]).parent)
        return [OpenedSource(spec.arg, "array_record", shards, spec.weight, vocab, tokenizer_dir)]
    if spec.kind == "seqio":
        seqio_split = config.seqio_split if split == "train" else config.seqio_eval_split
        out = []
        for task, rate in seqio_adapter.task_weights(spec.arg):
            documents = seqio_adapter.SeqioTaskDocuments(task, seqio_split, config.seqio_feature)
            out.append(OpenedSource(documents.name, "seqio", documents, spec.weight * rate,
                                    documents.vocab_size))
        return out
    raise DataError(f"unknown data source kind {spec.kind!r}")


def open_sources(config: DataConfig, split: str) -> list[OpenedSource]:
    """The sources of the train mixture, or of evaluation.

    Evaluation reads `data.eval_sources` when set; otherwise the held-out split of each train
    source that has one (the stdlib corpus, seqio Tasks). An empty list means no evaluation.
    """
    if split == "train":
        specs = config.train_sources
    elif config.eval_sources:
        specs = config.eval_sources
    else:
        specs = tuple(s for s in config.train_sources if s.kind in ("stdlib", "seqio"))
    opened = []
    for spec in specs:
        opened.extend(open_source(spec, config, split))
    return opened


class ToTokens(grain.transforms.MapWithIndex):
    """Document -> int32 ids (+ end-of-text), checked against the model's vocabulary."""

    def __init__(self, tokenizer: tokenizer_lib.TextTokenizer | None, add_eos: bool,
                 vocab_size: int, source_name: str, num_documents: int,
                 document_ends: np.ndarray | None = None):
        self._tokenizer = tokenizer
        self._num_documents = num_documents
        self._add_eos = add_eos
        self._ends = document_ends  # a piece cut from the middle of a file gets no end-of-text
        self._vocab_size = vocab_size
        self._source_name = source_name

    def map_with_index(self, index: int, document: str | np.ndarray) -> np.ndarray:
        # Past the first epoch a repeated (and shuffled) dataset passes indices beyond the
        # source's length; the document is the source's index modulo its length.
        index %= self._num_documents
        if isinstance(document, str):
            ids = self._tokenizer.encode(document)
            if self._add_eos and (self._ends is None or self._ends[index]):
                ids = np.append(ids, np.int32(self._tokenizer.eos_id))
        else:
            ids = np.asarray(document, np.int32).reshape(-1)
        if ids.size and (ids.min() < 0 or ids.max() >= self._vocab_size):
            bad = int(ids.max()) if ids.max() >= self._vocab_size else int(ids.min())
            raise DataError(f"token id {bad} in document {index} of data source "
                            f"{self._source_name!r} is outside the model's vocabulary "
                            f"[0, {self._vocab_size})")
        return ids


def resolve_tokenizer(config: DataConfig, vocab_size: int, workdir: str | pathlib.Path | None,
                      sources: list[OpenedSource], save: bool = True
                      ) -> tokenizer_lib.TextTokenizer | None:
    """The run's tokenizer, saved as `<workdir>/tokenizer.json`.

    Order: the one already saved in the workdir (a resumed run keeps its ids); `data.tokenizer`;
    a byte-level BPE trained on the text sources; the tokenizer.json beside ArrayRecord shards;
    none when every source is already token ids without one. `save=False` (processes other
    than the first in a multi-host run) reads the workdir but does not write it.
    """
    saved = pathlib.Path(workdir) / TOKENIZER_FILE if workdir else None
    if saved is not None and saved.is_file():
        tokenizer = tokenizer_lib.load_tokenizer(saved)
    elif config.tokenizer:
        tokenizer = tokenizer_lib.load_tokenizer(config.tokenizer)
    elif any(s.kind in TEXT_KINDS for s in sources):
        texts = (s.documents[i] for s in sources if s.kind in TEXT_KINDS
                 for i in range(len(s.documents)))
        logging.info("training a byte-level BPE tokenizer (vocab %d) on the text sources",
                     vocab_size)
        tokenizer = tokenizer_lib.train_bpe(texts, vocab_size, config.tokenizer_train_bytes)
    else:
        found = [pathlib.Path(s.tokenizer_dir) / TOKENIZER_FILE for s in sources
                 if s.tokenizer_dir and (pathlib.Path(s.tokenizer_dir) / TOKENIZER_FILE).is_file()]
        tokenizer = tokenizer_lib.load_tokenizer(found[0]) if found else None
    if tokenizer is None:
        return None
    if tokenizer.vocab_size > vocab_size:
        raise DataError(f"tokenizer {tokenizer.source!r} has {tokenizer.vocab_size} ids but "
                        f"model.vocab_size={vocab_size}")
    if config.add_eos and tokenizer.eos_id is None and any(s.kind in TEXT_KINDS for s in sources):
        raise DataError(f"tokenizer {tokenizer.source!r} has no end-of-text token; add one or "
                        "set data.add_eos=False")
    if save and saved is not None and not saved.is_file():
        tokenizer.save(saved)
    return tokenizer


def _token_dataset(source: OpenedSource, tokenizer, config: DataConfig, vocab_size: int,
                   shard: ProcessShard) -> grain.MapDataset:
    if source.kind in TEXT_KINDS and tokenizer is None:
        raise DataError(f"data source {source.name!r} is text but the run has no tokenizer")
    if source.vocab_size is not None and source.vocab_size > vocab_size:
        raise DataError(f"data source {source.name!r} was tokenised with a vocabulary of "
                        f"{source.vocab_size} ids but model.vocab_size={vocab_size}")
    if len(source.documents) < shard.count:
        raise DataError(f"data source {source.name!r} has {len(source.documents)} documents, "
                        f"fewer than the {shard.count} processes that share it")
    dataset = grain.MapDataset.source(source.documents)
    ends = getattr(source.documents, "document_ends", None)
    dataset = dataset.map_with_index(ToTokens(tokenizer, config.add_eos, vocab_size, source.name,
                                              len(source.documents), ends))
    return dataset[shard.index::shard.count]


def _local_batch_size(config: DataConfig, shard: ProcessShard) -> int:
    if config.batch_size % shard.count:
        raise DataError(f"data.batch_size={config.batch_size} does not divide over "
                        f"{shard.count} processes")
    return config.batch_size // shard.count


def _read_options(config: DataConfig) -> grain.ReadOptions:
    # Few threads: on a small machine the tokenizer threads compete with the train step.
    return grain.ReadOptions(num_threads=1 if config.num_workers else 2, prefetch_buffer_size=32)


def train_batches(config: DataConfig, sources: list[OpenedSource], tokenizer, vocab_size: int,
                  shard: ProcessShard = ProcessShard(), micro_batches: int = 1
                  ) -> grain.IterDataset:
    """The endless, shuffled, mixed, packed stream of per-process training batches; with
    `micro_batches` > 1, of batches that many times smaller (the batch ramp assembles each step
    from a growing number of them: `mimo_jax.train.batch_ramp`)."""
    rows = _local_batch_size(config, shard)
    if rows % micro_batches:
        raise DataError(f"data.batch_size={config.batch_size} gives {rows} rows per process, "
                        f"which do not split into {micro_batches} micro-batches")
    datasets = []
    for i, source in enumerate(sources):
        dataset = _token_dataset(source, tokenizer, config, vocab_size, shard)
        if config.shuffle:
            dataset = dataset.shuffle(seed=config.seed * 1_000 + i)
        datasets.append(dataset.repeat(None))
    if len(datasets) == 1:
        mixed = datasets[0]
    else:
        mixed = grain.MapDataset.mix(datasets, [s.weight for s in sources])
    stream = mixed.to_iter_dataset(_read_options(config))
    if config.num_workers:
        # Tokenisation runs in worker processes; worker i takes documents i, i + n, ... and the
        # results are interleaved back in order, so the stream does not depend on n.
        stream = stream.mp_prefetch(grain.MultiprocessingOptions(
            num_workers=config.num_workers, per_worker_buffer_size=config.worker_buffer_size))
    pad_id = tokenizer.pad_id if tokenizer is not None else 0
    packed = PackIterDataset(stream, config.seq_len, pad_id)
    return packed.batch(rows // micro_batches, drop_remainder=True)


def eval_batches(config: DataConfig, sources: list[OpenedSource], tokenizer, vocab_size: int,
                 shard: ProcessShard = ProcessShard()) -> Iterator[dict[str, np.ndarray]]:
    """`config.eval_batches` fixed per-process batches of held-out data, the same every call.

    Documents are read in order; when the held-out data runs out, batches are all padding
    (segment id 0, so they carry no loss) and every process still yields the same count.
    """
    local = _local_batch_size(config, shard)
    datasets = [_token_dataset(s, tokenizer, config, vocab_size, shard) for s in sources]
    stream = grain.MapDataset.concatenate(datasets).to_iter_dataset(_read_options(config))
    pad_id = tokenizer.pad_id if tokenizer is not None else 0
    rows = iter(PackIterDataset(stream, config.seq_len, pad_id))
    for _ in range(config.eval_batches):
        batch = {k: np.zeros((local, config.seq_len), np.int32) for k in BATCH_KEYS}
        batch["tokens"][:] = pad_id
        for r in range(local):
            row = next(rows, None)
            if row is None:
                break
            for key in BATCH_KEYS:
                batch[key][r] = row[key]
        yield batch


def describe_sources(sources: list[OpenedSource]) -> str:
    """One line per source: name, kind, documents, share of the mixture."""
    total = sum(s.weight for s in sources) or 1.0
    return "\n".join(f"  {s.name} ({s.kind}): {len(s.documents):,} documents, "
                     f"weight {s.weight / total:.3f}" for s in sources)
