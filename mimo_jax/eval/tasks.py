"""Domains of the post-training demonstration, whose answers the project computes itself.

Each task makes prompts from a seeded generator and solves them in plain Python:
  addition  "123+456="     -> "579"
  reverse   "reverse:abc=" -> "cba"
  sort      "sort:cab="    -> "abc"
and smaller versions for CPU-sized demonstrations: addition_small (operands below 100),
reverse_small (2 to 5 letters of a-h).
The held-out split is decided by a hash of the prompt, so no prompt is ever in both splits, for
any seeds. A response is read up to its first end-of-answer marker (a newline or the end-of-text
token); the reward registry scores it against the answer, and `None` names "no outcome reward".
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import pathlib
import re
import string
from typing import Callable, Sequence

import numpy as np

from mimo_jax.data.tokenizer import EOS_TOKEN

END_OF_ANSWER = ("\n", EOS_TOKEN)
SPLITS = ("train", "test")
Example = tuple[str, str]  # (prompt, answer)
Reward = Callable[[str, str, str], float]  # (prompt, response, answer) -> reward


@dataclasses.dataclass(frozen=True)
class Task:
    """A domain: a prompt generator, its solver, and which prompts are held out.

    make_prompt(rng) draws one prompt; solve(prompt) is its one correct answer.
    held_out_percent: share (in %) of all possible prompts that belong to the test split.
    """

    name: str
    make_prompt: Callable[[np.random.Generator], str]
    solve: Callable[[str], str]
    held_out_percent: int = 10

    def is_held_out(self, prompt: str) -> bool:
        """Whether `prompt` belongs to the test split (a fixed function of its text)."""
        digest = hashlib.sha256(prompt.encode("utf-8")).digest()
        return int.from_bytes(digest[:8], "little") % 100 < self.held_out_percent

    def examples(self, seed: int, count: int, split: str = "train") -> list[Example]:
        """`count` distinct (prompt, answer) pairs of `split`, the same for the same seed."""
        if split not in SPLITS:
            raise ValueError(f"split {split!r} is not one of {SPLITS}")
        rng = np.random.default_rng([seed, SPLITS.index(split)])
        want_held_out = split == "test"
        chosen: dict[str, str] = {}
        for _ in range(100 * count + 1_000):
            if len(chosen) == count:
                break
            prompt = self.make_prompt(rng)
            if prompt not in chosen and self.is_held_out(prompt) == want_held_out:
                chosen[prompt] = self.solve(prompt)
        if len(chosen) < count:
            raise ValueError(f"task {self.name!r} found only {len(chosen)} distinct {split} "
                             f"prompts, fewer than the {count} asked for")
        return list(chosen.items())

    def score(self, prompt: str, response: str) -> float:
        """1.0 when the response's answer is the solver's answer, else 0.0."""
        return exact_match(prompt, response, self.solve(prompt))


def _parse(task: str, pattern: str, prompt: str) -> re.Match:
    match = re.fullmatch(pattern, prompt)
    if match is None:
        raise ValueError(f"prompt {prompt!r} is not a {task} prompt (pattern {pattern!r})")
    return match


def addition_task(digits: int = 3, held_out_percent: int = 10) -> Task:
    """a+b= with operands of 1 to `digits` digits (uniform in [0, 10**digits))."""
    def make_prompt(rng: np.random.Generator) -> str:
        a, b = rng.integers(0, 10 ** digits, size=2)
        return f"{a}+{b}="

    def solve(prompt: str) -> str:
        match = _parse("addition", r"(\d+)\+(\d+)=", prompt)
        return str(int(match[1]) + int(match[2]))

    return Task("addition", make_prompt, solve, held_out_percent)


def _letters(rng: np.random.Generator, min_length: int, max_length: int, alphabet: str) -> str:
    length = int(rng.integers(min_length, max_length + 1))
    return "".join(rng.choice(list(alphabet), size=length))


def string_task(name: str, transform: Callable[[str], str], min_length: int = 3,
                max_length: int = 6, alphabet: str = string.ascii_lowercase,
                held_out_percent: int = 10) -> Task:
    """"<name>:<letters>=" -> transform(letters), with 3 to 6 letters by default."""
    def make_prompt(rng: np.random.Generator) -> str:
        return f"{name}:{_letters(rng, min_length, max_length, alphabet)}="

    pattern = f"{re.escape(name)}:([{re.escape(alphabet)}]*)="

    def solve(prompt: str) -> str:
        return transform(_parse(name, pattern, prompt)[1])

    return Task(name, make_prompt, solve, held_out_percent)


def reverse_task(**options) -> Task:
    """Reversing a short string: "reverse:abc=" -> "cba"."""
    return string_task("reverse", lambda letters: letters[::-1], **options)


def sort_task(**options) -> Task:
    """Sorting a short string's characters: "sort:cab=" -> "abc"."""
    return string_task("sort", lambda letters: "".join(sorted(letters)), **options)


def _renamed(task: Task, name: str) -> Task:
    return dataclasses.replace(task, name=name)


TASKS: dict[str, Task] = {task.name: task for task in (
    addition_task(), reverse_task(), sort_task(),
    # Smaller versions, learnt in minutes by a CPU-sized model (the MOPD demonstration).
    _renamed(addition_task(digits=2), "addition_small"),
    _renamed(reverse_task(min_length=2, max_length=5, alphabet="abcdefgh"), "reverse_small"))}


def get_task(name: str) -> Task:
    """The registered task `name`; a clear error lists the known ones."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(sorted(TASKS))}")
    return TASKS[name]


def extract_answer(response: str) -> str:
    """The response up to its first end-of-answer marker, without surrounding whitespace."""
    for marker in END_OF_ANSWER:
        response = response.split(marker, 1)[0]
    return response.strip()


def exact_match(prompt: str, response: str, answer: str) -> float:
    """1.0 when the response's answer equals `answer`, else 0.0."""
    del prompt  # the answer is already the prompt's solution
    return float(extract_answer(response) == answer)


def digit_match(prompt: str, response: str, answer: str) -> float:
    """Partial credit: characters equal at the same place counted from the right (place value
    for numbers), over the longer of the two; 1.0 only on an exact match."""
    del prompt
    given = extract_answer(response)
    longest = max(len(given), len(answer))
    if longest == 0:
        return 1.0
    same = sum(g == a for g, a in zip(reversed(given), reversed(answer)))
    return same / longest


REWARDS: dict[str, Reward] = {"exact_match": exact_match, "digit_match": digit_match}


def get_reward(name: str | None) -> Reward | None:
    """The reward function called `name`; None means no outcome reward."""
    if name is None:
        return None
    if name not in REWARDS:
        raise ValueError(f"unknown reward {name!r}; known rewards: {', '.join(sorted(REWARDS))} "
                         "(or None for no outcome reward)")
    return REWARDS[name]


def accuracy(examples: Sequence[Example], responses: Sequence[str]) -> float:
    """Share of responses whose answer exactly matches their example's answer."""
    if len(examples) != len(responses):
        raise ValueError(f"{len(examples)} examples but {len(responses)} responses")
    if not examples:
        raise ValueError("accuracy of no examples is undefined")
    scores = [exact_match(p, r, a) for (p, a), r in zip(examples, responses)]
    return float(np.mean(scores))


def write_sft_jsonl(path: str | pathlib.Path, examples: Sequence[Example]) -> pathlib.Path:
    """Writes one {"prompt": ..., "response": ...} line per (prompt, response) pair."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for prompt, response in examples:
            f.write(json.dumps({"prompt": prompt, "response": response}, ensure_ascii=False))
            f.write("\n")
    return path
