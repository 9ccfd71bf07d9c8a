"""Prompts for on-policy training: per-domain pools and a resumable stream of per-step batches.

A domain's pool is a list of (prompt, answer) pairs: a built-in task's training split
(`task:NAME`, `mimo_jax.eval.tasks`) or JSON-lines records with `prompt` and `answer` fields
(`jsonl:GLOB`). Each step takes `per_domain` prompts from every domain, walking each pool in a
shuffled order that is redrawn (from the seed and the epoch) whenever the pool is used up. The
stream's whole state is a few integers per domain, so a checkpoint stores it as JSON and a
resumed run draws exactly the prompts the uninterrupted one would have.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np

from mimo_jax.data.errors import DataError
from mimo_jax.data.sft import SftRecords
from mimo_jax.data.sources import expand_paths
from mimo_jax.eval.tasks import Example, get_task

# Training prompts drawn from a built-in task (distinct, from its training split).
TASK_POOL_SIZE = 4096


class PromptRecords(SftRecords):
    """(prompt, answer) records of JSON-lines files; errors name the file and line."""

    FIELDS = ("prompt", "answer")
    KIND = "prompt"


def prompt_pool(kind: str, arg: str, seed: int) -> list[Example]:
    """The (prompt, answer) pairs of one domain's source ("task", NAME) or ("jsonl", GLOB)."""
    if kind == "task":
        try:
            task = get_task(arg)
        except ValueError as err:
            raise DataError(f"prompt source 'task:{arg}': {err}") from err
        return task.examples(seed, TASK_POOL_SIZE, "train")
    if kind == "jsonl":
        records = PromptRecords(expand_paths(arg, "prompt data"), name=arg)
        return [(r["prompt"], r["answer"]) for r in (records[i] for i in range(len(records)))]
    raise DataError(f"prompt source kind {kind!r} is not 'task' or 'jsonl'")


@dataclasses.dataclass(frozen=True)
class PromptBatch:
    """One step's prompts: `examples[d]` are domain `domains[d]`'s (prompt, answer) pairs."""

    domains: tuple[str, ...]
    examples: tuple[tuple[Example, ...], ...]


class PromptStream:
    """An endless iterator of `PromptBatch`es with `get_state`/`set_state` (JSON-ready)."""

    def __init__(self, pools: dict[str, Sequence[Example]], per_domain: int, seed: int):
        for domain, pool in pools.items():
            if not pool:
                raise DataError(f"domain {domain!r} has no prompts")
        self._pools = {d: list(p) for d, p in pools.items()}
        self._per_domain = per_domain
        self._seed = seed
        self._position = {d: {"epoch": 0, "index": 0} for d in self._pools}

    def _order(self, domain: str, epoch: int) -> np.ndarray:
        domain_index = list(self._pools).index(domain)
        rng = np.random.default_rng([self._seed, domain_index, epoch])
        return rng.permutation(len(self._pools[domain]))

    def _take(self, domain: str) -> tuple[Example, ...]:
        position, pool = self._position[domain], self._pools[domain]
        taken = []
        while len(taken) < self._per_domain:
            order = self._order(domain, position["epoch"])
            while position["index"] < len(order) and len(taken) < self._per_domain:
                taken.append(pool[order[position["index"]]])
                position["index"] += 1
            if position["index"] == len(order):
                position["epoch"], position["index"] = position["epoch"] + 1, 0
        return tuple(taken)

    def __iter__(self) -> "PromptStream":
        return self

    def __next__(self) -> PromptBatch:
        domains = tuple(self._pools)
        return PromptBatch(domains, tuple(self._take(d) for d in domains))

    def get_state(self) -> dict[str, Any]:
        return {d: dict(p) for d, p in self._position.items()}

    def set_state(self, state: dict[str, Any]) -> None:
        if set(state) != set(self._pools):
            raise DataError(f"saved prompt position has domains {sorted(state)}, this run has "
                            f"{sorted(self._pools)}")
        self._position = {d: {"epoch": int(p["epoch"]), "index": int(p["index"])}
                          for d, p in state.items()}
