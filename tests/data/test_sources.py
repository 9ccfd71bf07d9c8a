"""Sources: text, JSON lines, ArrayRecord shards, the stdlib corpus, and their errors."""

import json

import numpy as np
import pytest

from mimo_jax.data import corpus
from mimo_jax.data.errors import DataError
from mimo_jax.data.sources import (JsonlDocuments, TextDocuments, TokenShards, expand_paths,
                                   token_shard_paths)
from mimo_jax.data.token_shards import write_shards


def test_text_documents_per_file_skip_empty(text_dir):
    files = expand_paths(str(text_dir), "text")
    docs = TextDocuments(files, "file")
    assert len(docs) == 40  # the empty file is not a document
    assert docs[3] == (text_dir / "doc03.txt").read_text()


def test_text_documents_per_line(tmp_path):
    (tmp_path / "a.txt").write_text("first line\n\n  \nsecond é line\nthird")
    (tmp_path / "b.txt").write_text("fourth\n")
    docs = TextDocuments(sorted(map(str, tmp_path.iterdir())), "line")
    assert [docs[i] for i in range(len(docs))] == [
        "first line\n", "second é line\n", "third", "fourth\n"]


def test_jsonl_documents_and_bad_lines(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text('{"text": "one"}\n\n{"text": "two", "id": 2}\n{"body": "x"}\nnot json\n')
    docs = JsonlDocuments([str(path)], field="text")
    assert (len(docs), docs[0], docs[1]) == (4, "one", "two")
    with pytest.raises(DataError, match="without the field 'text'"):
        docs[2]  # pylint: disable=pointless-statement
    with pytest.raises(DataError, match="not JSON"):
        docs[3]  # pylint: disable=pointless-statement


def test_missing_and_empty_paths(tmp_path):
    with pytest.raises(DataError, match="matches no files"):
        expand_paths(str(tmp_path / "nothing*.txt"), "text data")
    (tmp_path / "e1.txt").write_text("")
    (tmp_path / "e2.txt").write_text("")
    with pytest.raises(DataError, match="holds no documents"):
        TextDocuments(expand_paths(str(tmp_path), "text"), "file")
    with pytest.raises(DataError, match="holds no documents"):
        TextDocuments(expand_paths(str(tmp_path), "text"), "line")


def _shards(tmp_path, documents, per_shard=7):
    return write_shards(iter(documents), tmp_path / "shards", per_shard, {"vocab_size": 1000})


def test_array_record_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    documents = [rng.integers(0, 1000, size=n).astype(np.int32) for n in rng.integers(0, 50, 30)]
    metadata = _shards(tmp_path, documents)
    assert metadata["num_records"] == 30 and len(metadata["shards"]) == 5
    assert metadata["num_tokens"] == sum(d.size for d in documents)
    files, read_back = token_shard_paths(str(tmp_path / "shards"))
    assert read_back == metadata and len(files) == 5
    shards = TokenShards(files)
    assert len(shards) == 30
    for i in (0, 6, 7, 29):  # both sides of a shard border
        np.testing.assert_array_equal(shards[i], documents[i])
    # No scratch directory is left behind.
    assert not [p for p in (tmp_path / "shards").iterdir() if p.name.startswith(".")]


def test_corrupt_shard_is_named(tmp_path):
    rng = np.random.default_rng(0)
    _shards(tmp_path, [rng.integers(0, 1000, size=2000).astype(np.int32) for _ in range(40)], 20)
    files, _ = token_shard_paths(str(tmp_path / "shards"))
    data = bytearray(open(files[1], "rb").read())
    damaged = bytearray(data)
    damaged[len(data) // 3: len(data) // 3 + 64] = b"x" * 64  # bit rot inside the file
    with open(files[1], "wb") as f:
        f.write(bytes(damaged))
    shards = TokenShards(files)  # the index at the end of the file is intact
    with pytest.raises(DataError, match=f"shard '{files[1]}' is corrupt at record"):
        for i in range(len(shards)):
            shards[i]  # pylint: disable=pointless-statement
    with open(files[1], "wb") as f:
        f.write(bytes(data[: len(data) // 2]))  # a truncated copy, as after a failed transfer
    with pytest.raises(DataError, match=f"shard '{files[1]}' is corrupt"):
        TokenShards(files)
    with open(files[1], "wb") as f:
        f.write(b"not an array record file")
    with pytest.raises(DataError, match="corrupt or not an ArrayRecord"):
        TokenShards(files)


def test_unfinished_conversion_is_refused(tmp_path):
    _shards(tmp_path, [np.arange(5, dtype=np.int32)] * 3)
    (tmp_path / "shards" / "metadata.json").unlink()
    with pytest.raises(DataError, match="not a finished"):
        token_shard_paths(str(tmp_path / "shards"))


def test_record_not_int32_is_named(tmp_path):
    from array_record.python import array_record_module  # pylint: disable=import-outside-toplevel
    path = tmp_path / "odd.array_record"
    writer = array_record_module.ArrayRecordWriter(str(path), "group_size:1")
    writer.write(b"\x01\x02\x03")
    writer.close()
    with pytest.raises(DataError, match="record 0 has 3 bytes"):
        TokenShards([str(path)])[0]  # pylint: disable=expression-not-assigned


def test_stdlib_split_is_deterministic_and_disjoint():
    train = corpus.stdlib_files("train", 5.0)
    held_out = corpus.stdlib_files("eval", 5.0)
    assert train == sorted(train) and held_out == sorted(held_out)
    assert not set(train) & set(held_out)
    share = len(held_out) / (len(train) + len(held_out))
    assert 0.02 < share < 0.09
    # The split depends only on the relative path (same on every machine).
    root = corpus.stdlib_root()
    for path in held_out[:5]:
        assert corpus.is_eval_file(path.relative_to(root).as_posix(), 5.0)
    assert all("site-packages" not in p.parts for p in train)
    assert json.dumps([str(p) for p in corpus.stdlib_files("eval", 5.0)]) == json.dumps(
        [str(p) for p in held_out])


def test_files_cut_into_whole_line_pieces(tmp_path):
    lines = [f"line {i} " + "x" * (i % 7) + "\n" for i in range(50)] + ["y" * 300 + "\n", "end"]
    (tmp_path / "a.py").write_text("".join(lines))
    (tmp_path / "b.py").write_text("short\n")
    docs = TextDocuments(sorted(map(str, tmp_path.iterdir())), "file", max_bytes=100)
    pieces = [docs[i] for i in range(len(docs))]
    assert "".join(pieces[:-1]) == "".join(lines) and pieces[-1] == "short\n"
    assert all(len(p) <= 100 or p.count("\n") <= 1 for p in pieces)  # a long line stays whole
    assert all(p.endswith("\n") or p == "end" for p in pieces)
    # Only the last piece of each file ends a document.
    assert list(np.flatnonzero(docs.document_ends)) == [len(pieces) - 2, len(pieces) - 1]
