"""The pipeline end to end: batches, exact resume, mixtures, per-process shards, workers, eval."""

import collections

import numpy as np
import pytest

from mimo_jax.data import pipeline
from mimo_jax.data.config import data_config_from_dict
from mimo_jax.data.errors import DataError
from mimo_jax.data.token_shards import write_shards

VOCAB = 1000


def id_documents(tmp_path, name, first_id, count, seed):
    """ArrayRecord shards whose document i is the id `first_id + i` repeated: every token says
    which document it came from."""
    rng = np.random.default_rng(seed)
    documents = [np.full(int(n), first_id + i, np.int32)
                 for i, n in enumerate(rng.integers(1, 30, size=count))]
    write_shards(iter(documents), tmp_path / name, 16, {"vocab_size": VOCAB})
    return documents


def config(**overrides):
    values = dict(train_sources="stdlib", seq_len=32, batch_size=4, eval_batches=3)
    values.update(overrides)
    return data_config_from_dict(values)


def take(dataset, count, state=None):
    iterator = iter(dataset)
    if state is not None:
        iterator.set_state(state)
    batches = [next(iterator) for _ in range(count)]
    return batches, iterator


def build(cfg, tokenizer=None, shard=pipeline.ProcessShard()):
    sources = pipeline.open_sources(cfg, "train")
    return pipeline.train_batches(cfg, sources, tokenizer, VOCAB, shard)


def test_text_batches_match_the_tokenized_documents(text_dir, tokenizer):
    cfg = config(train_sources=f"text:{text_dir}", shuffle=False)
    batches, _ = take(build(cfg, tokenizer), 6)
    for batch in batches:
        assert set(batch) == {"tokens", "segment_ids", "positions"}
        assert all(v.dtype == np.int32 and v.shape == (4, 32) for v in batch.values())
    stream = np.concatenate([b["tokens"].reshape(-1) for b in batches])
    documents = [np.append(tokenizer.encode(p.read_text()), tokenizer.eos_id)
                 for p in sorted(text_dir.glob("doc*.txt"))]
    want = np.concatenate(documents)[: stream.size]
    np.testing.assert_array_equal(stream, want)  # unshuffled, no padding: the corpus in order


def test_end_of_text_only_where_a_file_ends(text_dir, tokenizer):
    cfg = config(train_sources=f"text:{text_dir}", shuffle=False, max_document_bytes=200)
    sources = pipeline.open_sources(cfg, "train")
    documents = sources[0].documents
    assert len(documents) > 40
    batches, _ = take(build(cfg, tokenizer), 8)
    stream = np.concatenate([b["tokens"].reshape(-1) for b in batches])
    want = np.concatenate([np.append(tokenizer.encode(documents[i]), [tokenizer.eos_id] * int(
        documents.document_ends[i])) for i in range(len(documents))])[: stream.size]
    np.testing.assert_array_equal(stream, want)
    assert 0 < int((stream == tokenizer.eos_id).sum()) < int((batches[0]["positions"] == 0).sum()
                                                               ) * len(batches)


def test_file_pieces_read_past_one_epoch(text_dir, tokenizer):
    """The second pass over a source cut into pieces (shuffled) ends each file's last piece
    with end-of-text as the first did: the pieces keep their own end flags epoch after epoch."""
    cfg = config(train_sources=f"text:{text_dir}", max_document_bytes=200, seed=1)
    documents = pipeline.open_sources(cfg, "train")[0].documents
    epoch_tokens = sum(len(tokenizer.encode(documents[i])) + int(documents.document_ends[i])
                       for i in range(len(documents)))
    batches = -(-3 * epoch_tokens // (4 * 32))  # about three epochs
    stream = np.concatenate([b["tokens"].reshape(-1) for b in take(build(cfg, tokenizer),
                                                                   batches)[0]])
    eos_per_epoch = int(documents.document_ends.sum())
    assert abs(int((stream == tokenizer.eos_id).sum()) - 3 * eos_per_epoch) <= eos_per_epoch


def test_resume_from_state_is_exact(tmp_path):
    id_documents(tmp_path, "ids", 10, 50, seed=0)
    cfg = config(train_sources=f"array_record:{tmp_path / 'ids'}", seed=3)
    straight, _ = take(build(cfg), 30)  # 30 batches run past one epoch (reshuffled)
    _, iterator = take(build(cfg), 11)
    state = iterator.get_state()
    resumed, _ = take(build(cfg), 19, state)
    for a, b in zip(straight[11:], resumed):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
    # A different seed gives a different order.
    other, _ = take(build(config(train_sources=f"array_record:{tmp_path / 'ids'}", seed=4)), 3)
    assert not np.array_equal(other[0]["tokens"], straight[0]["tokens"])


def documents_seen(batches):
    """Distinct (row, segment) pieces -> the document id that fills them."""
    seen = []
    for batch in batches:
        for row_tokens, row_segments in zip(batch["tokens"], batch["segment_ids"]):
            for segment in np.unique(row_segments[row_segments > 0]):
                seen.append(int(row_tokens[row_segments == segment][0]))
    return seen


def test_weighted_mixture(tmp_path):
    id_documents(tmp_path, "a", 100, 40, seed=1)
    id_documents(tmp_path, "b", 500, 40, seed=2)
    cfg = config(train_sources=f"array_record:{tmp_path / 'a'}@3,array_record:{tmp_path / 'b'}@1",
                 seq_len=64, batch_size=8)
    batches, _ = take(build(cfg), 60)
    # Counted per packed piece: documents are shorter than a row, so few are split in two.
    counts = collections.Counter("a" if doc < 500 else "b" for doc in documents_seen(batches))
    share = counts["a"] / (counts["a"] + counts["b"])
    assert 0.68 < share < 0.82, counts  # 3:1 by documents


def test_process_shards_are_disjoint_and_cover_everything(tmp_path):
    documents = id_documents(tmp_path, "ids", 10, 41, seed=5)
    cfg = config(train_sources=f"array_record:{tmp_path / 'ids'}", eval_batches=40)
    sources = pipeline.open_sources(cfg, "train")
    seen = []
    for index in range(2):
        shard = pipeline.ProcessShard(index, 2)
        evals = list(pipeline.eval_batches(cfg, sources, None, VOCAB, shard))
        assert all(b["tokens"].shape == (2, 32) for b in evals)  # half the global batch
        seen.append(set(documents_seen(evals)))
        train, _ = take(pipeline.train_batches(cfg, sources, None, VOCAB, shard), 10)
        assert set(documents_seen(train)) <= seen[-1]
    assert not seen[0] & seen[1]
    assert seen[0] | seen[1] == {int(d[0]) for d in documents}


def test_worker_processes_give_the_same_stream(text_dir, tokenizer):
    in_process = config(train_sources=f"text:{text_dir}", seed=7)
    workers = config(train_sources=f"text:{text_dir}", seed=7, num_workers=2)
    want, _ = take(build(in_process, tokenizer), 12)
    got, iterator = take(build(workers, tokenizer), 5)
    state = iterator.get_state()
    iterator.close()
    resumed, iterator = take(build(workers, tokenizer), 7, state)
    iterator.close()
    for a, b in zip(want, got + resumed):
        np.testing.assert_array_equal(a["tokens"], b["tokens"])
        np.testing.assert_array_equal(a["positions"], b["positions"])


def test_token_outside_vocabulary_is_named(tmp_path):
    documents = [np.arange(5, dtype=np.int32), np.array([3, VOCAB + 7, 4], np.int32)]
    write_shards(iter(documents), tmp_path / "bad", 10, {"vocab_size": VOCAB})
    cfg = config(train_sources=f"array_record:{tmp_path / 'bad'}", shuffle=False)
    with pytest.raises(DataError, match=f"token id {VOCAB + 7} in document 1 .* outside the "
                                        f"model's vocabulary"):
        take(build(cfg), 2)
    write_shards(iter(documents[:1]), tmp_path / "big", 10, {"vocab_size": VOCAB * 2})
    with pytest.raises(DataError, match="tokenised with a vocabulary of 2000 ids"):
        build(config(train_sources=f"array_record:{tmp_path / 'big'}"))


def test_eval_batches_are_fixed_and_padded(text_dir, tokenizer):
    cfg = config(train_sources=f"text:{text_dir}", eval_sources=f"text:{text_dir}/doc0*.txt",
                 eval_batches=40)
    sources = pipeline.open_sources(cfg, "eval")
    first = list(pipeline.eval_batches(cfg, sources, tokenizer, VOCAB))
    second = list(pipeline.eval_batches(cfg, sources, tokenizer, VOCAB))
    assert len(first) == 40
    for a, b in zip(first, second):
        np.testing.assert_array_equal(a["tokens"], b["tokens"])
    real = sum(int((b["segment_ids"] > 0).sum()) for b in first)
    want = sum(tokenizer.encode((text_dir / f"doc0{i}.txt").read_text()).size + 1
               for i in range(10))
    assert real == want  # every held-out token once, then all-padding batches
    assert (first[-1]["segment_ids"] == 0).all()


def test_tokenizer_is_trained_saved_and_reused(text_dir, tmp_path):
    cfg = config(train_sources=f"text:{text_dir}", tokenizer_train_bytes=100_000)
    sources = pipeline.open_sources(cfg, "train")
    trained = pipeline.resolve_tokenizer(cfg, 320, tmp_path, sources)
    assert (tmp_path / "tokenizer.json").is_file() and trained.vocab_size == 320
    again = pipeline.resolve_tokenizer(config(train_sources=f"text:{text_dir}",
                                              tokenizer_train_bytes=5_000), 320, tmp_path, sources)
    assert again.fingerprint() == trained.fingerprint()  # a resumed run keeps its ids
    with pytest.raises(DataError, match="has 320 ids but model.vocab_size=300"):
        pipeline.resolve_tokenizer(cfg, 300, tmp_path, sources)


def test_bad_data_config_values():
    from mimo_jax.config import ConfigError  # pylint: disable=import-outside-toplevel
    with pytest.raises(ConfigError, match="source kind 'parquet'"):
        config(train_sources="parquet:/x")
    with pytest.raises(ConfigError, match="weight '-1' must be > 0"):
        config(train_sources="stdlib@-1")
    with pytest.raises(ConfigError, match="'data.seq_len' = 1"):
        config(seq_len=1)
    with pytest.raises(ConfigError, match="'data.colour' is unknown"):
        config(colour=1)
    with pytest.raises(ConfigError, match="needs an argument"):
        config(train_sources="text")
