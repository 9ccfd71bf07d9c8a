r"""Converts text (or a seqio Task) into ArrayRecord shards of token ids for large corpora.

    python -m mimo_jax.data.to_array_record --input='/corpus/*.txt' --format=text \
        --output_dir=/data/shards --tokenizer=/path/tokenizer.json

Each record is one document's ids as little-endian int32 (end-of-text appended for text input).
The output directory gets `tokens-00000-of-00008.array_record`, the `tokenizer.json` used, and
`metadata.json`, written last: a directory without it is an interrupted conversion, and a
training run refuses it. Train on it with `--config.data.train_sources=array_record:/data/shards`.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import sys
from typing import Iterator

from absl import app, flags
import numpy as np

from mimo_jax.data import corpus
from mimo_jax.data import tokenizer as tokenizer_lib
from mimo_jax.data.errors import DataError
from mimo_jax.data.sources import (METADATA_FILE, SHARD_SUFFIX, TOKENS_FORMAT, JsonlDocuments,
                                   TextDocuments, expand_paths)

FORMATS = ("text", "jsonl", "stdlib", "seqio")

_INPUT = flags.DEFINE_string("input", None, "Glob or directory of text/JSONL files; the seqio "
                             "Task name for --format=seqio; ignored for --format=stdlib.")
_FORMAT = flags.DEFINE_enum("format", "text", FORMATS, "What --input holds.")
_OUTPUT_DIR = flags.DEFINE_string("output_dir", None, "Directory for the shards.")
_TOKENIZER = flags.DEFINE_string("tokenizer", "", "tokenizer.json to use; empty: train a "
                                 "byte-level BPE of --vocab_size on the input.")
_VOCAB_SIZE = flags.DEFINE_integer("vocab_size", 4096, "Vocabulary of a trained tokenizer.")
_TRAIN_BYTES = flags.DEFINE_integer("tokenizer_train_bytes", 8_000_000,
                                    "Characters of input used to train the tokenizer.")
_RECORDS_PER_SHARD = flags.DEFINE_integer("records_per_shard", 50_000, "Documents per shard.")
_ADD_EOS = flags.DEFINE_boolean("add_eos", True, "Append the end-of-text id to each document.")
_TEXT_DOCUMENT = flags.DEFINE_enum("text_document", "file", ["file", "line"],
                                   "For --format=text: one document per file or per line.")
_JSONL_FIELD = flags.DEFINE_string("jsonl_field", "text", "For --format=jsonl: the text field.")
_SPLIT = flags.DEFINE_string("split", "train", "For stdlib (train|eval) and seqio: the split.")
_EVAL_PERCENT = flags.DEFINE_float("eval_percent", 5.0, "For stdlib: held-out share.")
_FEATURE = flags.DEFINE_string("seqio_feature", "targets", "For seqio: the feature to store.")
_OVERWRITE = flags.DEFINE_boolean("overwrite", False, "Replace an existing conversion.")


def write_shards(documents: Iterator[np.ndarray], output_dir: str | os.PathLike,
                 records_per_shard: int, metadata: dict,
                 tokenizer: tokenizer_lib.TextTokenizer | None = None) -> dict:
    """Writes int32 documents into ArrayRecord shards plus tokenizer.json and metadata.json.

    Shards are written into a hidden scratch directory and moved into place only when all are
    complete; metadata.json is moved last. Returns the metadata written.
    """
    from array_record.python import array_record_module  # pylint: disable=import-outside-toplevel
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


def _text_documents() -> TextDocuments:
    if _FORMAT.value == "stdlib":
        return TextDocuments(corpus.stdlib_files(_SPLIT.value, _EVAL_PERCENT.value), "file",
                             f"stdlib[{_SPLIT.value}]")
    if not _INPUT.value:
        raise DataError(f"--input is required for --format={_FORMAT.value}")
    if _FORMAT.value == "jsonl":
        return JsonlDocuments(expand_paths(_INPUT.value, "JSON-lines input"), _JSONL_FIELD.value,
                              _INPUT.value)
    return TextDocuments(expand_paths(_INPUT.value, "text input"), _TEXT_DOCUMENT.value,
                         _INPUT.value)


def convert() -> dict:
    """Runs the conversion the flags describe; returns the metadata written."""
    if not _OUTPUT_DIR.value:
        raise DataError("--output_dir is required")
    if (pathlib.Path(_OUTPUT_DIR.value) / METADATA_FILE).exists() and not _OVERWRITE.value:
        raise DataError(f"{_OUTPUT_DIR.value!r} already holds a conversion; pass --overwrite")
    if _FORMAT.value == "seqio":
        from mimo_jax.data import seqio_adapter  # pylint: disable=import-outside-toplevel
        if not _INPUT.value:
            raise DataError("--input (the seqio Task name) is required for --format=seqio")
        documents = seqio_adapter.iterate_task(_INPUT.value, _SPLIT.value, _FEATURE.value)
        return write_shards(documents, _OUTPUT_DIR.value, _RECORDS_PER_SHARD.value,
                            {"source": f"seqio:{_INPUT.value}[{_SPLIT.value}]",
                             "vocab_size": seqio_adapter.task_vocab_size(_INPUT.value,
                                                                         _FEATURE.value)})
    texts = _text_documents()
    if _TOKENIZER.value:
        tokenizer = tokenizer_lib.load_tokenizer(_TOKENIZER.value)
    else:
        tokenizer = tokenizer_lib.train_bpe((texts[i] for i in range(len(texts))),
                                            _VOCAB_SIZE.value, _TRAIN_BYTES.value)
    if _ADD_EOS.value and tokenizer.eos_id is None:
        raise DataError(f"tokenizer {tokenizer.source!r} has no end-of-text token; "
                        "pass --noadd_eos")

    def tokenized() -> Iterator[np.ndarray]:
        for i in range(len(texts)):
            ids = tokenizer.encode(texts[i])
            yield np.append(ids, np.int32(tokenizer.eos_id)) if _ADD_EOS.value else ids

    return write_shards(tokenized(), _OUTPUT_DIR.value, _RECORDS_PER_SHARD.value,
                        {"source": f"{_FORMAT.value}:{_INPUT.value or ''}"}, tokenizer)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    try:
        metadata = convert()
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
    print(f"wrote {metadata['num_records']:,} documents, {metadata['num_tokens']:,} tokens in "
          f"{len(metadata['shards'])} shards to {_OUTPUT_DIR.value}")


if __name__ == "__main__":
    app.run(main)
