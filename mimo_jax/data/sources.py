"""Random-access document sources for Grain: text files, JSON lines, and ArrayRecord token shards.

Each source has `__len__` and `__getitem__` (Grain's `RandomAccessDataSource` protocol), so the
pipeline can shuffle globally and checkpoint a position as a plain index. Text sources return
strings (tokenised later in the pipeline); ArrayRecord sources return int32 token arrays.
"""

from __future__ import annotations

import bisect
import glob
import json
import os
import pathlib
from typing import Sequence

import grain
import numpy as np

from mimo_jax.data.errors import DataError

SHARD_SUFFIX = ".array_record"
METADATA_FILE = "metadata.json"
TOKENS_FORMAT = "mimo_jax.tokens.v1"  # each record: one document's ids, little-endian int32


def expand_paths(pattern: str, what: str, suffix: str = "") -> list[str]:
    """Sorted files matching a glob, or every file under a directory (recursively).

    Raises `DataError` naming the pattern when nothing matches.
    """
    path = pathlib.Path(pattern).expanduser()
    if path.is_dir():
        files = sorted(str(p) for p in path.rglob("*") if p.is_file() and p.name.endswith(suffix)
                       and not p.name.startswith("."))
    else:
        files = sorted(p for p in glob.glob(str(path), recursive=True)
                       if os.path.isfile(p) and p.endswith(suffix))
    if not files:
        raise DataError(f"{what} path {pattern!r} matches no files")
    return files


class TextDocuments:
    """Plain-text documents: one per file (optionally cut into chunks of whole lines), or one per
    non-blank line.

    `max_bytes` > 0 cuts each file at line ends into pieces of at most that many bytes (a longer
    single line stays whole), so that shuffling mixes parts of many files into every batch
    instead of long runs of one file. `document_ends[i]` says whether piece i ends its file: only
    those get the end-of-text token (None when every document is whole). Offsets are indexed once at start-up, so a document is one
    seek away.
    """

    def __init__(self, paths: Sequence[str | os.PathLike], unit: str = "file", name: str = "",
                 max_bytes: int = 0):
        self._paths = [str(p) for p in paths]
        self._unit = unit
        self.name = name or (self._paths[0] if len(self._paths) == 1 else f"{len(self._paths)} files")
        if unit == "file" and not max_bytes:
            self._files = np.array([i for i, p in enumerate(self._paths) if os.path.getsize(p)],
                                   np.int64)
            self._offsets = self._lengths = None
            self.document_ends = None
        elif unit == "file":
            self._files, self._offsets, self._lengths, self.document_ends = _index_chunks(
                self._paths, max_bytes)
        elif unit == "line":
            self._files, self._offsets, self._lengths = _index_lines(self._paths)
            self.document_ends = None
        else:
            raise ValueError(f"text document unit {unit!r} is not 'file' or 'line'")
        if len(self._files) == 0:
            raise DataError(f"data path {self.name!r} holds no documents (every file is empty)")

    def __len__(self) -> int:
        return len(self._files)

    def _read(self, index: int) -> bytes:
        path = self._paths[self._files[index]]
        with open(path, "rb") as f:
            if self._offsets is None:
                return f.read()
            f.seek(int(self._offsets[index]))
            return f.read(int(self._lengths[index]))

    def __getitem__(self, index: int) -> str:
        return self._read(index).decode("utf-8", errors="replace")

    def __repr__(self) -> str:
        return f"TextDocuments({self.name!r}, unit={self._unit!r}, documents={len(self)})"


class JsonlDocuments(TextDocuments):
    """JSON-lines documents: the string under `field` of each non-blank line."""

    def __init__(self, paths: Sequence[str | os.PathLike], field: str = "text", name: str = ""):
        super().__init__(paths, unit="line", name=name)
        self._field = field

    def __getitem__(self, index: int) -> str:
        raw = self._read(index)
        where = f"{self._paths[self._files[index]]!r} (document {index})"
        try:
            record = json.loads(raw)
        except json.JSONDecodeError as err:
            raise DataError(f"JSON-lines file {where} has a line that is not JSON: {err}") from err
        if not isinstance(record, dict) or self._field not in record:
            raise DataError(f"JSON-lines file {where} has a record without the field "
                            f"{self._field!r} (set data.jsonl_field)")
        text = record[self._field]
        if not isinstance(text, str):
            raise DataError(f"JSON-lines file {where}: field {self._field!r} is "
                            f"{type(text).__name__}, not a string")
        return text


def _index_lines(paths: Sequence[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    files, offsets, lengths = [], [], []
    for file_index, path in enumerate(paths):
        offset = 0
        with open(path, "rb") as f:
            for line in f:
                if line.strip():
                    files.append(file_index)
                    offsets.append(offset)
                    lengths.append(len(line))
                offset += len(line)
    return (np.asarray(files, np.int64), np.asarray(offsets, np.int64),
            np.asarray(lengths, np.int64))


def _index_chunks(paths: Sequence[str], max_bytes: int
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    pieces = []  # (file index, byte offset, byte length, ends its file)
    for file_index, path in enumerate(paths):
        with open(path, "rb") as f:
            data = f.read()
        start = position = 0
        for line in data.splitlines(keepends=True):
            if position > start and position + len(line) - start > max_bytes:
                pieces.append((file_index, start, position - start, False))
                start = position
            position += len(line)
        if position > start:
            pieces.append((file_index, start, position - start, True))
    files, offsets, lengths, ends = zip(*pieces) if pieces else ((), (), (), ())
    return (np.asarray(files, np.int64), np.asarray(offsets, np.int64),
            np.asarray(lengths, np.int64), np.asarray(ends, bool))


def read_shard_metadata(directory: str | os.PathLike) -> dict | None:
    """The `metadata.json` that `to_array_record` writes beside its shards, or None."""
    path = pathlib.Path(directory) / METADATA_FILE
    if not path.is_file():
        return None
    try:
        metadata = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise DataError(f"shard metadata {str(path)!r} is not valid JSON: {err}") from err
    if metadata.get("format") != TOKENS_FORMAT:
        raise DataError(f"shard metadata {str(path)!r} has format {metadata.get('format')!r}, "
                        f"expected {TOKENS_FORMAT!r}")
    return metadata


class TokenShards:
    """ArrayRecord shards whose records are documents of int32 token ids.

    Every shard is opened at start-up, so a shard that is not a readable ArrayRecord file fails
    before training with its path in the message; damage inside a shard surfaces on the read of
    the record it hits, again naming shard and record.
    """

    def __init__(self, paths: Sequence[str | os.PathLike], name: str = ""):
        self._paths = [str(p) for p in paths]
        self.name = name or (self._paths[0] if len(self._paths) == 1 else f"{len(self._paths)} shards")
        self._shards = []
        counts = []
        for path in self._paths:
            try:
                shard = grain.sources.ArrayRecordDataSource([path])
                counts.append(len(shard))
            except Exception as err:  # the reader raises RuntimeError/ValueError with Riegeli text
                raise DataError(f"ArrayRecord shard {path!r} is corrupt or not an ArrayRecord "
                                f"file: {err}") from err
            self._shards.append(shard)
        self._starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        if self._starts[-1] == 0:
            raise DataError(f"ArrayRecord path {self.name!r} holds no records")

    def __len__(self) -> int:
        return int(self._starts[-1])

    def __getitem__(self, index: int) -> np.ndarray:
        shard = bisect.bisect_right(self._starts, index) - 1
        local = int(index - self._starts[shard])
        try:
            raw = self._shards[shard][local]
        except Exception as err:
            raise DataError(f"ArrayRecord shard {self._paths[shard]!r} is corrupt at record "
                            f"{local}: {err}") from err
        if len(raw) % 4:
            raise DataError(f"ArrayRecord shard {self._paths[shard]!r} record {local} has "
                            f"{len(raw)} bytes, not a whole number of int32 token ids")
        return np.frombuffer(raw, dtype="<i4").astype(np.int32)

    def __repr__(self) -> str:
        return f"TokenShards({self.name!r}, records={len(self)})"


def token_shard_paths(arg: str) -> tuple[list[str], dict | None]:
    """Shard files and metadata of an `array_record:` source.

    A directory must hold the `metadata.json` that `to_array_record` writes last (without it the
    conversion did not finish); a glob of shard files reads metadata beside them when present.
    """
    if os.path.isdir(arg):
        metadata = read_shard_metadata(arg)
        if metadata is None:
            raise DataError(f"ArrayRecord directory {arg!r} has no {METADATA_FILE}: it is not a "
                            "finished `mimo_jax.data.to_array_record` conversion")
        files = [os.path.join(arg, name) for name in metadata.get("shards", [])]
        missing = [f for f in files if not os.path.isfile(f)]
        if missing:
            raise DataError(f"ArrayRecord shard {missing[0]!r} listed in {METADATA_FILE} is missing")
        if not files:
            files = expand_paths(arg, "ArrayRecord", suffix=SHARD_SUFFIX)
        return files, metadata
    files = expand_paths(arg, "ArrayRecord", suffix=SHARD_SUFFIX)
    return files, read_shard_metadata(os.path.dirname(files[0]))
