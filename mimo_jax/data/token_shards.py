"""Converts text (or a seqio Task) into ArrayRecord shards of token ids, for large corpora.

`python -m mimo_jax.data.to_array_record` is the command line over `convert`; tests and scripts
call `write_shards` directly with documents they make.

Each record is one document's ids as little-endian int32 (end-of-text appended for text input).
The output directory gets `tokens-00000-of-00008.array_record`, the `tokenizer.json` used, and
`metadata.json`, written last: a directory without it is an interrupted conversion, and a
training run refuses it (`sources.token_shard_paths`). Train on it with
`--config.data.train_sources=array_record:/data/shards`.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
from typing import Iterator

import numpy as np
from array_record.python import array_record_module

from mimo_jax.data import corpus, seqio_adapter
from mimo_jax.data import tokenizer as tokenizer_lib
from mimo_jax.data.errors import DataError
from mimo_jax.data.sources import (METADATA_FILE, SHARD_SUFFIX, TOKENS_FORMAT, JsonlDocuments,
                                   TextDocuments, expand_paths)

FORMATS = ("text", "jsonl", "stdlib", "seqio")


def write_shards(documents: Iterator[np.ndarray], output_dir: str | os.PathLike,
                 records_per_shard: int, metadata: dict,
                 tokenizer: tokenizer_lib.TextTokenizer | None = None) -> dict:
    """Writes int32 documents into ArrayRecord shards plus tokenizer.json and metadata.json.

    Shards are written into a hidden scratch directory and moved into place only when all are
    complete; metadata.json is moved last. Returns the metadata written.
    """
    if records_per_shard < 1:
        raise DataError(f"records_per_shard={records_per_shard} must be >= 1")
    output = pathlib.Path(output_dir)
    output.mkdir(parents=True, exist_ok=True)
    scratch = output / f".partial-{os.getpid()}"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir()
    shard_files: list[pathlib.Path] = []
    writer = None
    count = tokens = 0
    max_id = -1
    for document in documents:
        if count % records_per_shard == 0:
            if writer is not None:
                writer.close()
            shard_files.append(scratch / f"shard-{len(shard_files):05d}{SHARD_SUFFIX}")
            # group_size:1 keeps every record individually addressable for random access.
            writer = array_record_module.ArrayRecordWriter(str(shard_files[-1]), "group_size:1")
        ids = np.asarray(document, "<i4").reshape(-1)
        writer.write(ids.tobytes())
        count += 1
        tokens += ids.size
        if ids.size:
            max_id = max(max_id, int(ids.max()))
    if writer is not None:
        writer.close()
    if count == 0:
        shutil.rmtree(scratch)
        raise DataError("the input holds no documents; nothing was written")
    for stale in list(output.glob(f"*{SHARD_SUFFIX}")) + [output / METADATA_FILE]:
        stale.unlink(missing_ok=True)
    names = []
    for i, path in enumerate(shard_files):
        name = f"tokens-{i:05d}-of-{len(shard_files):05d}{SHARD_SUFFIX}"
        path.replace(output / name)
        names.append(name)
    if tokenizer is not None:
        tokenizer.save(output / "tokenizer.json")
    metadata = dict(metadata, format=TOKENS_FORMAT, dtype="int32", num_records=count,
                    num_tokens=tokens, max_token_id=max_id, shards=names)
    if tokenizer is not None:
        metadata.setdefault("vocab_size", tokenizer.vocab_size)
        metadata["tokenizer_sha256"] = tokenizer.fingerprint()
    metadata.setdefault("vocab_size", max_id + 1)
    tmp = scratch / METADATA_FILE
    tmp.write_text(json.dumps(metadata, indent=2))
    tmp.replace(output / METADATA_FILE)
    shutil.rmtree(scratch)
    return metadata


def _text_documents(input_format: str, input_path: str, *, text_document: str, jsonl_field: str,
                    split: str, eval_percent: float) -> TextDocuments | JsonlDocuments:
    if input_format == "stdlib":
        return TextDocuments(corpus.stdlib_files(split, eval_percent), "file", f"stdlib[{split}]")
    if not input_path:
        raise DataError(f"--input is required for --format={input_format}")
    if input_format == "jsonl":
        return JsonlDocuments(expand_paths(input_path, "JSON-lines input"), jsonl_field,
                              input_path)
    return TextDocuments(expand_paths(input_path, "text input"), text_document, input_path)


def convert(output_dir: str, *, input_format: str = "text", input_path: str = "",
            tokenizer: str = "", vocab_size: int = 4096,
            tokenizer_train_bytes: int = 8_000_000, records_per_shard: int = 50_000,
            add_eos: bool = True, text_document: str = "file", jsonl_field: str = "text",
            split: str = "train", eval_percent: float = 5.0, seqio_feature: str = "targets",
            overwrite: bool = False) -> dict:
    """Converts one input into token shards in `output_dir`; returns the metadata written.

    Args:
      output_dir: where the shards go; one holding a finished conversion is refused unless
        `overwrite`.
      input_format: "text" or "jsonl" (files matching `input_path`, a glob or directory),
        "stdlib" (the embedded corpus, `split` of it) or "seqio" (`input_path` is the Task name).
      input_path: see `input_format`; ignored for "stdlib".
      tokenizer: a tokenizer.json; empty trains a byte-level BPE of `vocab_size` ids on the first
        `tokenizer_train_bytes` characters of the input (text formats only).
      records_per_shard: documents per shard.
      add_eos: append the tokenizer's end-of-text id to each text document.
      text_document: for "text", one document per "file" or per "line".
      jsonl_field: for "jsonl", the field holding the text.
      split: "train" or "eval" for "stdlib" (with `eval_percent` held out), the split for "seqio".
      seqio_feature: for "seqio", the feature to store.
    Raises `DataError` naming the bad value.
    """
    if input_format not in FORMATS:
        raise DataError(f"--format={input_format!r} is not one of {FORMATS}")
    if (pathlib.Path(output_dir) / METADATA_FILE).exists() and not overwrite:
        raise DataError(f"{output_dir!r} already holds a conversion; pass --overwrite")
    if input_format == "seqio":
        if not input_path:
            raise DataError("--input (the seqio Task name) is required for --format=seqio")
        documents = seqio_adapter.iterate_task(input_path, split, seqio_feature)
        return write_shards(documents, output_dir, records_per_shard,
                            {"source": f"seqio:{input_path}[{split}]",
                             "vocab_size": seqio_adapter.task_vocab_size(input_path,
                                                                         seqio_feature)})
    texts = _text_documents(input_format, input_path, text_document=text_document,
                            jsonl_field=jsonl_field, split=split, eval_percent=eval_percent)
    if tokenizer:
        text_tokenizer = tokenizer_lib.load_tokenizer(tokenizer)
    else:
        text_tokenizer = tokenizer_lib.train_bpe((texts[i] for i in range(len(texts))),
                                                 vocab_size, tokenizer_train_bytes)
    if add_eos and text_tokenizer.eos_id is None:
        raise DataError(f"tokenizer {text_tokenizer.source!r} has no end-of-text token; "
                        "pass --noadd_eos")

    def tokenized() -> Iterator[np.ndarray]:
        for i in range(len(texts)):
            ids = text_tokenizer.encode(texts[i])
            yield np.append(ids, np.int32(text_tokenizer.eos_id)) if add_eos else ids

    return write_shards(tokenized(), output_dir, records_per_shard,
                        {"source": f"{input_format}:{input_path or ''}"}, text_tokenizer)
