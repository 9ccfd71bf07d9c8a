"""Demonstration tasks: deterministic, disjoint splits, correct solvers and rewards."""

import json

import numpy as np
import pytest

from mimo_jax.eval import tasks


@pytest.mark.parametrize("name", sorted(tasks.TASKS))
def test_examples_are_deterministic_distinct_and_split_by_hash(name):
    task = tasks.get_task(name)
    train = task.examples(seed=3, count=200)
    assert train == task.examples(seed=3, count=200)
    assert train != task.examples(seed=4, count=200)
    assert len({p for p, _ in train}) == 200
    # Test prompts from any seed never appear in training prompts from any seed.
    test = task.examples(seed=3, count=60, split="test") + task.examples(seed=9, count=60,
                                                                         split="test")
    train += task.examples(seed=9, count=200)
    assert not {p for p, _ in train} & {p for p, _ in test}
    assert all(task.is_held_out(p) for p, _ in test)
    assert not any(task.is_held_out(p) for p, _ in train)
    # The hash keeps roughly held_out_percent of the prompts.
    rng = np.random.default_rng(0)
    held_out = np.mean([task.is_held_out(task.make_prompt(rng)) for _ in range(2_000)])
    assert 0.07 < held_out < 0.13
    for prompt, answer in train[:50]:
        assert task.score(prompt, answer + "\n") == 1.0


def test_solvers_on_handmade_prompts():
    assert tasks.get_task("addition").solve("123+456=") == "579"
    assert tasks.get_task("addition").solve("999+1=") == "1000"
    assert tasks.get_task("reverse").solve("reverse:abcde=") == "edcba"
    assert tasks.get_task("sort").solve("sort:dbcab=") == "abbcd"
    with pytest.raises(ValueError, match="'sort:abc' is not a sort prompt"):
        tasks.get_task("sort").solve("sort:abc")
    assert tasks.addition_task(digits=5).examples(0, 1)[0][0].endswith("=")


def test_rewards_on_handmade_responses():
    exact, digits = tasks.get_reward("exact_match"), tasks.get_reward("digit_match")
    prompt, answer = "123+456=", "579"
    assert exact(prompt, "579", answer) == 1.0
    assert exact(prompt, "579\n12+3=15", answer) == 1.0  # only up to the end of the answer
    assert exact(prompt, " 579<|endoftext|>junk", answer) == 1.0
    assert exact(prompt, "578", answer) == 0.0
    assert exact(prompt, "5790", answer) == 0.0
    assert exact(prompt, "", answer) == 0.0
    assert digits(prompt, "579", answer) == 1.0
    assert digits(prompt, "589", answer) == pytest.approx(2 / 3)
    assert digits(prompt, "1579", answer) == pytest.approx(3 / 4)  # place value from the right
    assert digits(prompt, "79\n", answer) == pytest.approx(2 / 3)
    assert digits(prompt, "abc", answer) == 0.0
    assert tasks.get_task("reverse").score("reverse:abc=", "cba") == 1.0
    assert tasks.get_task("reverse").score("reverse:abc=", "abc") == 0.0


def test_unknown_names_raise_and_list_known_ones():
    assert tasks.get_reward(None) is None
    with pytest.raises(ValueError, match=r"unknown reward 'exact'.*digit_match, exact_match"):
        tasks.get_reward("exact")
    with pytest.raises(ValueError, match=r"unknown task 'multiply'.*addition, addition_small, "
                                         r"reverse, reverse_small, sort"):
        tasks.get_task("multiply")
    with pytest.raises(ValueError, match="split 'valid'"):
        tasks.get_task("sort").examples(0, 3, split="valid")
    tiny = tasks.string_task("reverse", lambda s: s[::-1], min_length=1, max_length=1,
                             alphabet="ab")
    with pytest.raises(ValueError, match="found only 2 distinct train prompts, fewer than the 5"):
        tiny.examples(0, 5)


def test_accuracy_and_sft_jsonl(tmp_path):
    examples = [("1+2=", "3"), ("reverse:ab=", "ba"), ("sort:ba=", "ab"), ("9+9=", "18")]
    assert tasks.accuracy(examples, ["3", "ba\n", "ba", "18<|endoftext|>"]) == 0.75
    with pytest.raises(ValueError, match="4 examples but 3 responses"):
        tasks.accuracy(examples, ["3", "ba", "ab"])
    path = tasks.write_sft_jsonl(tmp_path / "sub" / "sft.jsonl", examples)
    lines = path.read_text(encoding="utf-8").splitlines()
    assert [json.loads(line) for line in lines] == [{"prompt": p, "response": a}
                                                    for p, a in examples]
