"""Synthetic long-context retrieval tasks, built in token ids so that lengths and depths are exact.

Each sample is a haystack of filler tokens (held-out text) with facts inserted at chosen depths,
ending in a query whose answer is the value of one fact:

  niah_multi   K needles "\\nmagic_<key> = <value>\\n" (K-1 distractors at seeded random depths,
               the queried one at the cell's depth); the query repeats the queried needle's
               prefix "\\nmagic_<key> =" and the answer is " <value>". This is the report's
               multi-needle retrieval; because the query repeats the needle's prefix, a copying
               (induction) mechanism over the whole context answers it.
  multi_hop    a chain "\\n<v0> = <value>\\n", "\\n<v1> = <v0>\\n", ... "\\n<vH> = <vH-1>\\n", the
               first link at the cell's depth and the others at seeded depths after it, in order;
               the query is "\\nassert <vH> ==" and the answer " <value>": H hops to follow.

A cell (length, depth) draws its samples from a generator seeded by (seed, task, length, depth),
so every sample is the same for the same arguments. The pieces of a fact are encoded separately
and concatenated, so the answer's ids in the query are exactly its ids inside the haystack.
"""

from __future__ import annotations

import dataclasses
import string

import numpy as np

from mimo_jax.data.tokenizer import TextTokenizer

NIAH, MULTI_HOP = "niah_multi", "multi_hop"
TASKS = (NIAH, MULTI_HOP)
_TASK_SEED = {NIAH: 1, MULTI_HOP: 2}


@dataclasses.dataclass(frozen=True)
class Sample:
    """One retrieval sample of exactly `tokens.size` ids.

    tokens:        [L] int32, haystack + facts + query + answer.
    answer_start:  index of the answer's first id in `tokens` (the answer runs to the end).
    query_start:   index of the query's first id (the filler and facts lie before it).
    fact_starts:   index in `tokens` of each inserted fact's first id; the queried needle (or the
                   chain's first link) is fact 0.
    fact_lengths:  ids in each fact.
    answer:        the answer's text (e.g. " 4821").
    """

    tokens: np.ndarray
    answer_start: int
    query_start: int
    fact_starts: tuple[int, ...]
    fact_lengths: tuple[int, ...]
    answer: str


def _word(rng: np.random.Generator, size: int = 5) -> str:
    return "".join(rng.choice(list(string.ascii_lowercase), size=size))


def _value(rng: np.random.Generator) -> str:
    return str(int(rng.integers(100, 1000)))


def _assemble(filler: np.ndarray, facts: list[np.ndarray], depths: list[float],
              query: np.ndarray, answer: np.ndarray, answer_text: str) -> Sample:
    """Filler with `facts` inserted at filler index round(depth * filler size), then the query and
    the answer. Facts at the same index keep their list order."""
    cuts = [int(round(d * filler.size)) for d in depths]
    order = sorted(range(len(facts)), key=lambda i: (cuts[i], i))
    pieces, starts, done, at = [], [0] * len(facts), 0, 0
    for i in order:
        pieces.append(filler[done:cuts[i]])
        at += cuts[i] - done
        done = cuts[i]
        starts[i] = at
        pieces.append(facts[i])
        at += facts[i].size
    pieces += [filler[done:], query, answer]
    tokens = np.concatenate(pieces).astype(np.int32)
    answer_start = tokens.size - answer.size
    return Sample(tokens, answer_start, answer_start - query.size, tuple(starts),
                  tuple(f.size for f in facts), answer_text)


def _filler(stream: np.ndarray, size: int, length: int, rng: np.random.Generator
            ) -> np.ndarray:
    """`size` consecutive ids of `stream` from a seeded offset (the stream repeats if short);
    ValueError when the sample's `length` leaves no room for filler."""
    if size < 1:
        raise ValueError(f"length {length} is too short for the sample's facts and query "
                         f"({length - size} ids); give longer lengths, fewer needles or hops")
    reps = -(-(size + 1) // stream.size) + 1
    long = np.tile(stream, reps) if reps > 1 else stream
    start = int(rng.integers(0, long.size - size))
    return long[start:start + size]


@dataclasses.dataclass(frozen=True)
class Facts:
    """One sample's facts as text, before any filler.

    facts:  each fact as the pieces it is encoded in (their ids concatenated), fact 0 first: the
            queried needle or the chain's first link, whose middle piece is the answer.
    query:  the text before the answer, e.g. "\\nmagic_abcde =".
    answer: e.g. " 482".
    """

    facts: tuple[tuple[str, ...], ...]
    query: str
    answer: str


def _distinct_words(rng: np.random.Generator, count: int) -> list[str]:
    words: list[str] = []
    while len(words) < count:
        word = _word(rng)
        if word not in words:
            words.append(word)
    return words


def niah_facts(rng: np.random.Generator, needles: int) -> Facts:
    """`needles` needles "\\nmagic_<key> = <value>\\n" with distinct keys; needle 0 is queried."""
    keys = _distinct_words(rng, needles)
    values = [_value(rng) for _ in keys]
    facts = tuple((f"\nmagic_{k} =", f" {v}", "\n") for k, v in zip(keys, values))
    return Facts(facts, f"\nmagic_{keys[0]} =", f" {values[0]}")


def multi_hop_facts(rng: np.random.Generator, hops: int) -> Facts:
    """A chain "\\n<v0> = <value>\\n", "\\n<v1> = <v0>\\n", ...; the query asks for v<hops>."""
    names = _distinct_words(rng, hops + 1)
    value = _value(rng)
    facts = ((f"\n{names[0]} =", f" {value}", "\n"),) + tuple(
        (f"\n{names[i]} = {names[i - 1]}\n",) for i in range(1, hops + 1))
    return Facts(facts, f"\nassert {names[-1]} ==", f" {value}")


def draw_facts(task: str, rng: np.random.Generator, *, needles: int = 4, hops: int = 2
               ) -> tuple[Facts, list[float]]:
    """A sample's facts, and for facts 1.. their draws in [0, 1] (fact 0's depth is the caller's
    choice): niah_multi's distractor depths, uniform; multi_hop's later links, sorted, as shares
    of the span from the first link to the end (so the chain stays in order)."""
    if task == NIAH:
        return niah_facts(rng, needles), [float(d) for d in rng.uniform(0, 1, needles - 1)]
    return multi_hop_facts(rng, hops), sorted(float(d) for d in rng.uniform(0, 1, hops))


def _sample(tokenizer: TextTokenizer, stream: np.ndarray, length: int, depth: float,
            task: str, rng: np.random.Generator, needles: int, hops: int) -> Sample:
    """A sample of `length` ids whose fact 0 starts at `depth` of the filler (niah_multi: the
    distractors at uniform random depths; multi_hop: the later links at sorted random depths
    after the first)."""
    drawn, later = draw_facts(task, rng, needles=needles, hops=hops)
    facts = [np.concatenate([tokenizer.encode(piece) for piece in pieces])
             for pieces in drawn.facts]
    if task == MULTI_HOP:
        later = [depth + (1 - depth) * d for d in later]
    query, answer = tokenizer.encode(drawn.query), tokenizer.encode(drawn.answer)
    size = length - sum(f.size for f in facts) - query.size - answer.size
    filler = _filler(stream, size, length, rng)
    return _assemble(filler, facts, [depth] + later, query, answer, drawn.answer)


def make_samples(task: str, tokenizer: TextTokenizer, stream: np.ndarray, length: int,
                 depth: float, count: int, *, seed: int, needles: int = 4,
                 hops: int = 2) -> list[Sample]:
    """`count` samples of `task` at (`length`, `depth`), the same for the same arguments.

    stream: [N] int32 filler ids (e.g. held-out text), N >= 1. `needles` is niah_multi's K,
    `hops` multi_hop's chain length. Raises ValueError naming a bad argument.
    """
    if task not in TASKS:
        raise ValueError(f"task {task!r} is not one of {TASKS}")
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth {depth} is not in [0, 1]")
    if stream.size == 0:
        raise ValueError("the filler stream holds no tokens")
    if needles < 1:
        raise ValueError(f"needles={needles} must be at least 1")
    if hops < 1:
        raise ValueError(f"hops={hops} must be at least 1")
    rng = np.random.default_rng([seed, _TASK_SEED[task], length, int(round(depth * 1e6))])
    return [_sample(tokenizer, stream, length, depth, task, rng, needles, hops)
            for _ in range(count)]
