"""SFT data: response-only loss masks, whole-example packing, exact resume, and bad input."""

import json

import numpy as np
import pytest

from mimo_jax.data import sft
from mimo_jax.data.errors import DataError

SEQ_LEN = 40


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


@pytest.fixture(name="sft_file")
def fixture_sft_file(tmp_path):
    """60 examples of random word counts; a few do not fit in a row of SEQ_LEN tokens."""
    rng = np.random.default_rng(5)
    words = ["alpha", "beta", "gamma", "x", "=", "+", "return", "self"]
    records = []
    for _ in range(60):
        prompt = " ".join(rng.choice(words, size=int(rng.integers(0, 6))))
        response = " ".join(rng.choice(words, size=int(rng.integers(1, 8 if rng.random() < 0.9
                                                                     else 30))))
        records.append({"prompt": prompt, "response": response})
    return write_jsonl(tmp_path / "sft.jsonl", records), records


def test_loss_mask_covers_exactly_the_response_targets(tokenizer):
    example = sft.tokenize_example(tokenizer, "def x =", " return self")
    prompt_ids, response_ids = tokenizer.encode("def x ="), tokenizer.encode(" return self")
    np.testing.assert_array_equal(
        example["tokens"], np.concatenate([prompt_ids, response_ids, [tokenizer.eos_id]]))
    want = np.r_[np.zeros(prompt_ids.size), np.ones(response_ids.size + 1)]
    np.testing.assert_array_equal(example["loss_mask"], want)
    assert tokenizer.decode(example["tokens"][example["loss_mask"] == 1]) == (
        " return self<|endoftext|>")
    # With no prompt, the opening token has no predictor, so it is not a target.
    bare = sft.tokenize_example(tokenizer, "", "alpha beta")
    assert bare["loss_mask"][0] == 0 and bare["loss_mask"][1:].all()
    no_eos = sft.tokenize_example(tokenizer, "x", "beta", add_eos=False)
    assert no_eos["tokens"][-1] != tokenizer.eos_id


def test_packing_keeps_every_fitting_example_whole_and_in_order(sft_file, tokenizer):
    path, records = sft_file
    examples = [sft.tokenize_example(tokenizer, r["prompt"], r["response"]) for r in records]
    fitting = [e for e in examples if e["tokens"].size <= SEQ_LEN]
    assert 0 < len(examples) - len(fitting) < 15  # some are dropped, most are kept
    iterator = iter(sft.sft_rows(sft.open_sft_records(str(path)), tokenizer, SEQ_LEN,
                                 shuffle=False, num_epochs=1))
    rows = list(iterator)
    assert sft.dropped_examples(iterator.get_state()) == len(examples) - len(fitting)
    unpacked = []
    for i, row in enumerate(rows):
        assert set(row) == set(sft.SFT_KEYS)
        assert all(row[k].shape == (SEQ_LEN,) and row[k].dtype == np.int32 for k in row)
        segments = row["segment_ids"]
        used = int(np.count_nonzero(segments))
        # Examples fill a prefix of the row with ids 1, 2, ...; padding follows.
        assert (segments[used:] == 0).all() and (row["tokens"][used:] == tokenizer.pad_id).all()
        assert (row["loss_mask"][used:] == 0).all() and (row["positions"][used:] == 0).all()
        np.testing.assert_array_equal(np.unique(segments[:used]), np.arange(1, segments.max() + 1))
        assert (np.diff(segments[:used]) >= 0).all()
        for segment in range(1, segments.max() + 1):
            where = segments == segment
            np.testing.assert_array_equal(row["positions"][where], np.arange(where.sum()))
            unpacked.append((row["tokens"][where], row["loss_mask"][where]))
        if i + 1 < len(rows):  # greedy: the next row's first example would not have fitted
            assert used + int(np.sum(rows[i + 1]["segment_ids"] == 1)) > SEQ_LEN
    assert len(unpacked) == len(fitting)
    for (tokens, mask), example in zip(unpacked, fitting):
        np.testing.assert_array_equal(tokens, example["tokens"])
        np.testing.assert_array_equal(mask, example["loss_mask"])


def test_resume_gives_the_same_batches_and_drop_count(sft_file, tokenizer):
    path, _ = sft_file
    records = sft.open_sft_records(str(path))
    batches = sft.sft_batches(records, tokenizer, SEQ_LEN, 3, seed=7)
    first = iter(batches)
    for _ in range(9):  # past the first epoch, so the reshuffled order is exercised
        next(first)
    state = first.get_state()
    want = [next(first) for _ in range(6)]
    resumed = iter(sft.sft_batches(records, tokenizer, SEQ_LEN, 3, seed=7))
    resumed.set_state(state)
    got = [next(resumed) for _ in range(6)]
    for g, w in zip(got, want):
        for key in sft.SFT_KEYS:
            assert g[key].shape == (3, SEQ_LEN)
            np.testing.assert_array_equal(g[key], w[key], err_msg=key)
    assert sft.dropped_examples(resumed.get_state()) == sft.dropped_examples(first.get_state())
    assert sft.dropped_examples(first.get_state()) > 0


def test_too_long_error_mode_and_bad_options(sft_file, tokenizer):
    path, _ = sft_file
    records = sft.open_sft_records(str(path))
    rows = sft.sft_rows(records, tokenizer, SEQ_LEN, shuffle=False, num_epochs=1,
                        too_long="error")
    with pytest.raises(DataError, match=f"does not fit in a row of seq_len={SEQ_LEN}"):
        list(rows)
    with pytest.raises(ValueError, match="too_long='cut'"):
        sft.sft_rows(records, tokenizer, SEQ_LEN, too_long="cut")


@pytest.mark.parametrize("lines,message", [
    (['{"prompt": "a", "response": "b"}', "", '{"prompt": "a", "response": "b"'],
     "line 3 is not JSON"),
    (['{"prompt": "a", "response": "b"}', '{"prompt": "a"}'], "line 2 has no field 'response'"),
    (['{"response": "b"}'], "line 1 has no field 'prompt'"),
    (['{"prompt": 3, "response": "b"}'], "line 1: field 'prompt' is int, not a string"),
    (['["a", "b"]'], "line 1 is a JSON list"),
])
def test_bad_records_name_file_and_line(tmp_path, lines, message):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    records = sft.open_sft_records(str(path))
    with pytest.raises(DataError, match=f"'{path}' {message}"):
        [records[i] for i in range(len(records))]


def test_empty_files_are_refused(tmp_path):
    good = write_jsonl(tmp_path / "good.jsonl", [{"prompt": "a", "response": "b"}])
    (tmp_path / "blank.jsonl").write_text("\n  \n", encoding="utf-8")
    with pytest.raises(DataError, match="blank.jsonl' holds no examples"):
        sft.SftRecords([good, tmp_path / "blank.jsonl"])
    (tmp_path / "empty.jsonl").write_text("", encoding="utf-8")
    with pytest.raises(DataError, match="empty.jsonl' holds no"):
        sft.SftRecords([tmp_path / "empty.jsonl"])
    with pytest.raises(DataError, match="matches no files"):
        sft.open_sft_records(str(tmp_path / "missing*.jsonl"))
