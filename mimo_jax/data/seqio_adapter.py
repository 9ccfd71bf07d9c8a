"""seqio Tasks and Mixtures as Grain sources (needs the optional `seqio` extra).

seqio itself is imported only when a `seqio:` source is opened, so the core install does not
need TensorFlow. A Task's split is read once, in order, through seqio's own preprocessors, and
kept as token arrays in memory: that gives Grain random access, so the run shuffles, mixes and
checkpoints it like any other source. A Mixture is expanded into its Tasks with seqio's rates as
Grain mixture weights (seqio's tf.data sampling is not checkpointable). For splits too large to
hold in memory, convert them once with `python -m mimo_jax.data.to_array_record --format=seqio`.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np

from mimo_jax.data.errors import DataError


def _seqio():
    try:
        # The `seqio` extra (it brings TensorFlow): imported only when a seqio source is used.
        import seqio  # pylint: disable=import-outside-toplevel
    except ImportError as err:
        raise DataError("a 'seqio:' data source needs the seqio package: "
                        "pip install -e '.[seqio]'") from err
    return seqio


def task_weights(name: str) -> list[tuple[str, float]]:
    """(task name, relative weight) for a registered Task (weight 1) or each Task of a Mixture."""
    seqio = _seqio()
    try:
        provider = seqio.get_mixture_or_task(name)
    except ValueError as err:
        raise DataError(f"seqio source {name!r} is not a registered Task or Mixture "
                        f"(import the module that registers it first): {err}") from err
    if isinstance(provider, seqio.Mixture):
        weights = [(task.name, float(provider.get_rate(task))) for task in provider.tasks]
        weights = [(n, w) for n, w in weights if w > 0]
        if not weights:
            raise DataError(f"seqio Mixture {name!r} has no Task with a positive rate")
        return weights
    return [(provider.name, 1.0)]


def iterate_task(name: str, split: str, feature: str) -> Iterator[np.ndarray]:
    """Yields each example's `feature` of a seqio Task's split as an int32 token array, in order."""
    seqio = _seqio()
    task = seqio.get_mixture_or_task(name)
    if split not in task.splits:
        raise DataError(f"seqio Task {name!r} has no split {split!r}; it has {list(task.splits)}")
    if feature not in task.output_features:
        raise DataError(f"seqio Task {name!r} has no output feature {feature!r}; it has "
                        f"{sorted(task.output_features)} (set data.seqio_feature)")
    dataset = task.get_dataset(sequence_length=None, split=split, shuffle=False, num_epochs=1,
                               use_cached=False)
    for example in dataset.as_numpy_iterator():
        yield np.asarray(example[feature], np.int32).reshape(-1)


def task_vocab_size(name: str, feature: str) -> int:
    """Number of ids the vocabulary of a Task's feature can produce."""
    features = _seqio().get_mixture_or_task(name).output_features
    if feature not in features:
        raise DataError(f"seqio Task {name!r} has no output feature {feature!r}; it has "
                        f"{sorted(features)} (set data.seqio_feature)")
    return int(features[feature].vocabulary.vocab_size)


class SeqioTaskDocuments:
    """One seqio Task's split, held in memory as token arrays, with random access."""

    def __init__(self, name: str, split: str, feature: str):
        self.name = f"seqio:{name}[{split}]"
        self._documents = list(iterate_task(name, split, feature))
        self.vocab_size = task_vocab_size(name, feature)
        if not self._documents:
            raise DataError(f"seqio Task {name!r} split {split!r} holds no examples")

    def __len__(self) -> int:
        return len(self._documents)

    def __getitem__(self, index: int) -> np.ndarray:
        return self._documents[index]

    def __repr__(self) -> str:
        return f"SeqioTaskDocuments({self.name!r}, documents={len(self)})"
