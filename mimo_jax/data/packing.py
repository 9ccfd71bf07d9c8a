"""Packing token documents into fixed-length rows with segment ids and per-document positions.

Documents are laid end to end ("concatenate then split"): a row is filled with whole documents
until the next one does not fit; that one is split, its head ends the row and its tail starts the
next row. Each piece is its own segment, so attention never crosses a document or a row boundary
and positions restart at 0 at the start of every piece. A finite stream pads its last row.

Row format (numpy int32, each [T]):
  tokens       token ids; `pad_id` on padding
  segment_ids  1, 2, ... per piece in the row; 0 on padding
  positions    0, 1, ... within each piece; 0 on padding

The iterator's checkpoint state is the parent's state before the partly emitted document plus how
many of its tokens were already emitted, so a restored iterator continues mid-document exactly.
"""

from __future__ import annotations

from typing import Any

import grain
import numpy as np


def pack_documents(documents: list[np.ndarray], seq_len: int, pad_id: int = 0
                   ) -> list[dict[str, np.ndarray]]:
    """Packs a finite list of documents; the plain reference the iterator is tested against."""
    rows = []
    iterator = iter(PackIterDataset(grain.MapDataset.source(documents).to_iter_dataset(),
                                    seq_len, pad_id))
    for row in iterator:
        rows.append(row)
    return rows


class PackIterDataset(grain.IterDataset):
    """Turns a stream of 1-D int token arrays into packed rows of length `seq_len`."""

    def __init__(self, parent: grain.IterDataset, seq_len: int, pad_id: int = 0):
        super().__init__(parent)
        if seq_len < 1:
            raise ValueError(f"seq_len={seq_len} must be >= 1")
        self._seq_len = seq_len
        self._pad_id = pad_id

    def __iter__(self) -> "_PackIterator":
        return _PackIterator(self._parent.__iter__(), self._seq_len, self._pad_id)

    def __str__(self) -> str:
        return f"PackIterDataset(seq_len={self._seq_len})"


class _PackIterator(grain.DatasetIterator):
    """Iterator of `PackIterDataset`; see the module docstring for the state it keeps."""

    def __init__(self, parent: grain.DatasetIterator, seq_len: int, pad_id: int):
        super().__init__(parent)
        self._seq_len = seq_len
        self._pad_id = pad_id
        self._pending: np.ndarray | None = None  # the document being emitted
        self._pending_parent_state: Any = None  # parent state before `_pending` was read
        self._offset = 0  # tokens of `_pending` already emitted

    def _read_document(self) -> bool:
        """Loads the next non-empty document into `_pending`; False at the end of the stream."""
        while True:
            state = self._parent.get_state()
            try:
                document = next(self._parent)
            except StopIteration:
                return False
            document = np.asarray(document).reshape(-1)
            if document.size:
                self._pending, self._pending_parent_state, self._offset = document, state, 0
                return True

    def __next__(self) -> dict[str, np.ndarray]:
        length = self._seq_len
        tokens = np.full(length, self._pad_id, np.int32)
        segment_ids = np.zeros(length, np.int32)
        positions = np.zeros(length, np.int32)
        filled, segment = 0, 0
        while filled < length:
            if self._pending is None and not self._read_document():
                break
            piece = self._pending[self._offset: self._offset + length - filled]
            segment += 1
            tokens[filled: filled + piece.size] = piece
            segment_ids[filled: filled + piece.size] = segment
            positions[filled: filled + piece.size] = np.arange(piece.size, dtype=np.int32)
            filled += piece.size
            self._offset += piece.size
            if self._offset == self._pending.size:
                self._pending = None
        if filled == 0:
            raise StopIteration
        return {"tokens": tokens, "segment_ids": segment_ids, "positions": positions}

    def get_state(self) -> dict[str, Any]:
        if self._pending is None:
            return {"parent": self._parent.get_state(), "offset": 0}
        return {"parent": self._pending_parent_state, "offset": self._offset}

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["parent"])
        self._pending = None
        if state["offset"]:
            if not self._read_document():
                raise ValueError("packing state points past the end of its input stream")
            self._offset = int(state["offset"])
