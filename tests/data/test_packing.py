"""Packing: rows against a plain list-based reference, and exact resume from mid-document state."""

import grain
import numpy as np
import pytest

from mimo_jax.data.packing import PackIterDataset, pack_documents


def reference_pack(documents, seq_len, pad_id):
    """Concatenate-then-split written the obvious way: walk every token, start a new row when full."""
    rows, tokens, segments, positions = [], [], [], []
    segment, position = 0, 0

    def flush():
        pad = seq_len - len(tokens)
        rows.append({"tokens": np.array(tokens + [pad_id] * pad, np.int32),
                     "segment_ids": np.array(segments + [0] * pad, np.int32),
                     "positions": np.array(positions + [0] * pad, np.int32)})

    for document in documents:
        new_piece = True
        for token in document:
            if len(tokens) == seq_len:
                flush()
                tokens, segments, positions, segment = [], [], [], 0
                new_piece = True
            if new_piece:
                segment, position, new_piece = segment + 1, 0, False
            tokens.append(int(token))
            segments.append(segment)
            positions.append(position)
            position += 1
    if tokens:
        flush()
    return rows


def random_documents(seed, count, max_len):
    rng = np.random.default_rng(seed)
    # Lengths include 0 (skipped), 1, and documents longer than a row (split across rows).
    lengths = rng.integers(0, max_len, size=count)
    return [rng.integers(3, 1000, size=n).astype(np.int32) for n in lengths]


@pytest.mark.parametrize("seq_len,max_len", [(16, 40), (7, 5), (64, 200)])
def test_pack_matches_reference(seq_len, max_len):
    documents = random_documents(seq_len, 60, max_len)
    got = pack_documents(documents, seq_len, pad_id=2)
    want = reference_pack(documents, seq_len, pad_id=2)
    assert len(got) == len(want)
    for g, w in zip(got, want):
        for key in ("tokens", "segment_ids", "positions"):
            np.testing.assert_array_equal(g[key], w[key], err_msg=key)
    # Every token appears exactly once, in order.
    flat = np.concatenate([r["tokens"][r["segment_ids"] > 0] for r in got])
    np.testing.assert_array_equal(flat, np.concatenate(documents))


def test_row_format_invariants():
    rows = pack_documents(random_documents(3, 30, 50), 32, pad_id=0)
    for row in rows:
        seg, pos = row["segment_ids"], row["positions"]
        real = seg > 0
        # Padding only at the end; positions restart at each piece and are 0 on padding.
        assert not np.any(real[np.argmin(real):]) or real.all()
        starts = np.concatenate([[True], seg[1:] != seg[:-1]])
        assert np.all(pos[starts & real] == 0)
        assert np.all(pos[~real] == 0)
        assert np.all(np.diff(pos)[~starts[1:] & real[1:]] == 1)
        assert list(np.unique(seg[real])) == list(range(1, seg.max() + 1))


@pytest.mark.parametrize("stop_after", [1, 3, 7])
def test_state_resumes_mid_document(stop_after):
    documents = random_documents(11, 80, 60)
    dataset = PackIterDataset(grain.MapDataset.source(documents).to_iter_dataset(), 24)
    all_rows = list(dataset)
    iterator = iter(dataset)
    for _ in range(stop_after):
        next(iterator)
    state = iterator.get_state()
    resumed = iter(dataset)
    resumed.set_state(state)
    rest = list(resumed)
    assert len(rest) == len(all_rows) - stop_after
    for g, w in zip(rest, all_rows[stop_after:]):
        np.testing.assert_array_equal(g["tokens"], w["tokens"])
        np.testing.assert_array_equal(g["segment_ids"], w["segment_ids"])
