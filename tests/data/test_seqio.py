"""A real seqio Task and Mixture fed through the adapter (skipped without the `seqio` extra)."""

import functools

import numpy as np
import pytest

seqio = pytest.importorskip(
    "seqio", reason="seqio is the optional extra (pip install -e '.[seqio]'); the adapter "
                    "is tested where it is installed")
tf = pytest.importorskip("tensorflow", reason="seqio needs TensorFlow")

from mimo_jax.data import pipeline, seqio_adapter  # noqa: E402
from mimo_jax.data.config import data_config_from_dict  # noqa: E402
from mimo_jax.data.errors import DataError  # noqa: E402
from mimo_jax.data.sources import TokenShards, token_shard_paths  # noqa: E402
from mimo_jax.data.token_shards import write_shards  # noqa: E402

TEXTS = {
    "train": ["def f(x):\n    return x", "import os", "class A: pass", "print('hi')", "x = 1"],
    "validation": ["y = 2", "assert True"],
}


def _register(name: str, texts: dict[str, list[str]]) -> None:
    if name in seqio.TaskRegistry.names():
        return

    def dataset_fn(split, shuffle_files, seed=None):
        del shuffle_files, seed
        return tf.data.Dataset.from_tensor_slices({"text": texts[split]})

    seqio.TaskRegistry.add(
        name,
        source=seqio.FunctionDataSource(dataset_fn, splits=tuple(texts)),
        preprocessors=[functools.partial(seqio.preprocessors.rekey, key_map={"targets": "text"}),
                       seqio.preprocessors.tokenize, seqio.preprocessors.append_eos],
        output_features={"targets": seqio.Feature(seqio.ByteVocabulary(), add_eos=True)})


@pytest.fixture(scope="module", autouse=True)
def _tasks():
    _register("mimo_test_code", TEXTS)
    _register("mimo_test_other", {"train": ["zzz", "qqq qqq"], "validation": ["zz"]})
    if "mimo_test_mixture" not in seqio.MixtureRegistry.names():
        seqio.MixtureRegistry.add("mimo_test_mixture",
                                  [("mimo_test_code", 3.0), ("mimo_test_other", 1.0)])


def byte_ids(text: str) -> np.ndarray:
    """seqio's ByteVocabulary: byte + 3 (0 pad, 1 eos, 2 unk), then EOS."""
    return np.array([b + 3 for b in text.encode("utf-8")] + [1], np.int32)


def test_task_through_the_pipeline():
    cfg = data_config_from_dict(dict(train_sources="seqio:mimo_test_code", seq_len=16,
                                     batch_size=2, shuffle=False))
    sources = pipeline.open_sources(cfg, "train")
    assert [s.name for s in sources] == ["seqio:mimo_test_code[train]"]
    assert sources[0].vocab_size == 259
    iterator = iter(pipeline.train_batches(cfg, sources, None, 300))
    stream = np.concatenate([next(iterator)["tokens"].reshape(-1) for _ in range(3)])
    want = np.concatenate([byte_ids(t) for t in TEXTS["train"] * 3])[: stream.size]
    np.testing.assert_array_equal(stream, want)
    held_out = pipeline.open_sources(cfg, "eval")  # the Task's validation split
    assert len(held_out[0].documents) == 2
    np.testing.assert_array_equal(held_out[0].documents[1], byte_ids("assert True"))


def test_mixture_becomes_weighted_tasks():
    assert seqio_adapter.task_weights("mimo_test_mixture") == [
        ("mimo_test_code", 3.0), ("mimo_test_other", 1.0)]
    cfg = data_config_from_dict(dict(train_sources="seqio:mimo_test_mixture@2", seq_len=16,
                                     batch_size=2))
    sources = pipeline.open_sources(cfg, "train")
    assert [s.weight for s in sources] == [6.0, 2.0]
    with pytest.raises(DataError, match="not a registered Task or Mixture"):
        seqio_adapter.task_weights("no_such_task")
    with pytest.raises(DataError, match="no output feature 'inputs'"):
        seqio_adapter.task_vocab_size("mimo_test_code", "inputs")


def test_task_to_array_record(tmp_path):
    documents = seqio_adapter.iterate_task("mimo_test_code", "train", "targets")
    write_shards(documents, tmp_path / "shards", 2, {"vocab_size": 259})
    files, metadata = token_shard_paths(str(tmp_path / "shards"))
    assert metadata["num_records"] == 5 and len(files) == 3
    shards = TokenShards(files)
    for i, text in enumerate(TEXTS["train"]):
        np.testing.assert_array_equal(shards[i], byte_ids(text))
