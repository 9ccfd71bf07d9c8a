r"""`python -m mimo_jax.data.to_array_record`: text (or a seqio Task) -> ArrayRecord token shards.

    python -m mimo_jax.data.to_array_record --input='/corpus/*.txt' --format=text \
        --output_dir=/data/shards --tokenizer=/path/tokenizer.json

Flags map one to one onto `mimo_jax.data.token_shards.convert`, which says what each does. Train on
the result with `--config.data.train_sources=array_record:/data/shards`. A bad path or value ends
with one line `error: ...` and exit status 1.
"""

from __future__ import annotations

from typing import Sequence

from absl import app, flags

from mimo_jax.cli import exit_after_run, run_command
from mimo_jax.data import token_shards
from mimo_jax.data.errors import DataError

_INPUT = flags.DEFINE_string("input", None, "Glob or directory of text/JSONL files; the seqio "
                             "Task name for --format=seqio; ignored for --format=stdlib.")
_FORMAT = flags.DEFINE_enum("format", "text", token_shards.FORMATS, "What --input holds.")
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


def _run(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    try:
        if not _OUTPUT_DIR.value:
            raise DataError("--output_dir is required")
        metadata = token_shards.convert(
            _OUTPUT_DIR.value, input_format=_FORMAT.value, input_path=_INPUT.value or "",
            tokenizer=_TOKENIZER.value, vocab_size=_VOCAB_SIZE.value,
            tokenizer_train_bytes=_TRAIN_BYTES.value, records_per_shard=_RECORDS_PER_SHARD.value,
            add_eos=_ADD_EOS.value, text_document=_TEXT_DOCUMENT.value,
            jsonl_field=_JSONL_FIELD.value, split=_SPLIT.value, eval_percent=_EVAL_PERCENT.value,
            seqio_feature=_FEATURE.value, overwrite=_OVERWRITE.value)
    except DataError as err:
        exit_after_run(f"error: {err}")
    print(f"wrote {metadata['num_records']:,} documents, {metadata['num_tokens']:,} tokens in "
          f"{len(metadata['shards'])} shards to {_OUTPUT_DIR.value}")


def main(argv: Sequence[str] | None = None) -> None:
    """Runs the command on `argv` (program name first; default `sys.argv`), then exits."""
    run_command(_run, argv)
