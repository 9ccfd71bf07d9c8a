"""Held-out accuracy of a model on a task domain: greedy answers, checked by the task itself."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from mimo_jax.data.tokenizer import TextTokenizer
from mimo_jax.eval.tasks import Example, accuracy
from mimo_jax.inference import on_mesh
from mimo_jax.inference.generation import generate
from mimo_jax.model.transformer import MiMoV2Flash
from mimo_jax.parallel import Parallelism


def greedy_answers(model: MiMoV2Flash, params: Any, tokenizer: TextTokenizer,
                   prompts: Sequence[str], *, max_new_tokens: int, batch_size: int = 64,
                   parallelism: Parallelism | None = None) -> list[str]:
    """Each prompt's greedy continuation (up to an end-of-text token or `max_new_tokens`).

    Prompts are right-padded to the longest one of their batch; every batch but the last has
    `batch_size` rows (the last is padded with copies of its first prompt, so shapes repeat).
    With `parallelism` the generation runs on its mesh, every batch padded to a multiple of the
    batch shards.
    """
    stops = () if tokenizer.eos_id is None else (tokenizer.eos_id,)
    encoded = [tokenizer.encode(p) for p in prompts]
    width = max(row.size for row in encoded)
    shards = 1 if parallelism is None else on_mesh.batch_shards(parallelism)
    answers: list[str] = []
    for start in range(0, len(encoded), batch_size):
        rows = encoded[start:start + batch_size]
        count = len(rows)
        target = batch_size if len(encoded) > batch_size else count
        rows = rows + [rows[0]] * (-(-target // shards) * shards - count)
        ids = np.full((len(rows), width), tokenizer.pad_id, np.int32)
        for i, row in enumerate(rows):
            ids[i, :row.size] = row
        lengths = np.asarray([row.size for row in rows], np.int32)
        out = generate(model, params, ids, lengths, max_new_tokens=max_new_tokens,
                       stop_tokens=stops, parallelism=parallelism)
        answers.extend(tokenizer.decode(out.generated(i)) for i in range(count))
    return answers


def task_accuracy(model: MiMoV2Flash, params: Any, tokenizer: TextTokenizer,
                  examples: Sequence[Example], *, max_new_tokens: int, batch_size: int = 64,
                  parallelism: Parallelism | None = None) -> float:
    """Share of `examples` (prompt, answer) whose greedy answer is exactly right."""
    responses = greedy_answers(model, params, tokenizer, [p for p, _ in examples],
                               max_new_tokens=max_new_tokens, batch_size=batch_size,
                               parallelism=parallelism)
    return accuracy(examples, responses)
