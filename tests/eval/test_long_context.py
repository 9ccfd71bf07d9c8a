"""Long-context evaluation (`python -m mimo_jax.eval.long_context`): the synthetic retrieval tasks
are seeded and put their facts where asked, the teacher-forced scoring and the position buckets
are what they say, and the command runs on a micro checkpoint and stops bad input with one line."""

import json
import pathlib
import re
import subprocess
import sys

import jax
import numpy as np
import pytest

from mimo_jax.config import model_config_from_dict
from mimo_jax.data.tokenizer import load_tokenizer
from mimo_jax.eval import context_eval, context_scoring, context_tasks
from mimo_jax.model.transformer import MiMoV2Flash, init_params
from mimo_jax.train import trainer
from mimo_jax.train.checkpoint import export_params

REPO = pathlib.Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module", name="tokenizer")
def fixture_tokenizer(corpus_dir):
    return load_tokenizer(corpus_dir / "tokenizer.json")


@pytest.fixture(scope="module", name="stream")
def fixture_stream(tokenizer):
    """Filler ids: random ids of the tokenizer's vocabulary (never all one id)."""
    return np.random.default_rng(3).integers(2, tokenizer.vocab_size, 500).astype(np.int32)


@pytest.fixture(scope="module", name="micro_model")
def fixture_micro_model(micro, corpus_dir):
    """(run config at 64 tokens, model, params) of the micro model, randomly initialised
    (seed 1)."""
    config = micro.build_config(micro.micro_overrides(corpus_dir, **{"data.seq_len": 64}))
    model = MiMoV2Flash(model_config_from_dict(config.model))
    return config, model, init_params(model, jax.random.key(1))


def _filler_before(sample: context_tasks.Sample, fact: int) -> int:
    start = sample.fact_starts[fact]
    inserted = sum(n for s, n in zip(sample.fact_starts, sample.fact_lengths) if s < start)
    return start - inserted


@pytest.mark.parametrize("length,depth", [(96, 0.0), (96, 0.5), (160, 0.9), (160, 1.0)])
def test_niah_samples_are_seeded_and_put_the_queried_needle_at_its_depth(
        tokenizer, stream, length, depth):
    samples = context_tasks.make_samples(context_tasks.NIAH, tokenizer, stream, length, depth, 3,
                                         seed=5, needles=3)
    again = context_tasks.make_samples(context_tasks.NIAH, tokenizer, stream, length, depth, 3,
                                       seed=5, needles=3)
    other = context_tasks.make_samples(context_tasks.NIAH, tokenizer, stream, length, depth, 3,
                                       seed=6, needles=3)
    assert all(np.array_equal(a.tokens, b.tokens) for a, b in zip(samples, again))
    assert not all(np.array_equal(a.tokens, b.tokens) for a, b in zip(samples, other))
    for sample in samples:
        assert sample.tokens.shape == (length,) and sample.tokens.dtype == np.int32
        assert len(sample.fact_starts) == len(sample.fact_lengths) == 3
        filler = sample.query_start - sum(sample.fact_lengths)
        assert _filler_before(sample, 0) == round(depth * filler)
        # The query repeats needle 0's prefix; the answer closes the row and is needle 0's value.
        key = re.fullmatch(r"(?s).*\nmagic_([a-z]{5}) =",
                           tokenizer.decode(sample.tokens[:sample.answer_start])).group(1)
        prefix = tokenizer.encode(f"\nmagic_{key} =")
        answer = tokenizer.encode(sample.answer)
        start = sample.fact_starts[0]
        needle = np.concatenate([prefix, answer, tokenizer.encode("\n")])
        assert sample.fact_lengths[0] == needle.size
        np.testing.assert_array_equal(sample.tokens[start:start + needle.size], needle)
        np.testing.assert_array_equal(sample.tokens[sample.query_start:sample.answer_start],
                                      prefix)
        np.testing.assert_array_equal(sample.tokens[sample.answer_start:], answer)
        assert re.fullmatch(r" [0-9]{3}", sample.answer)
        # The distractors have other keys.
        text = tokenizer.decode(sample.tokens[:sample.query_start])
        assert len(set(re.findall(r"magic_([a-z]{5}) =", text))) == 3


def test_multi_hop_chain_starts_at_its_depth_and_runs_in_order(tokenizer, stream):
    for sample in context_tasks.make_samples(context_tasks.MULTI_HOP, tokenizer, stream, 128, 0.25,
                                             4, seed=0, hops=3):
        assert sample.tokens.size == 128 and len(sample.fact_starts) == 4
        assert list(sample.fact_starts) == sorted(sample.fact_starts)
        filler = sample.query_start - sum(sample.fact_lengths)
        assert _filler_before(sample, 0) == round(0.25 * filler)
        facts = [tokenizer.decode(sample.tokens[s:s + n])
                 for s, n in zip(sample.fact_starts, sample.fact_lengths)]
        names = [re.fullmatch(r"\n([a-z]{5}) = .*\n", f).group(1) for f in facts]
        assert facts[0] == f"\n{names[0]} ={sample.answer}\n"
        assert facts[1:] == [f"\n{names[i]} = {names[i - 1]}\n" for i in range(1, 4)]
        query = tokenizer.decode(sample.tokens[sample.query_start:sample.answer_start])
        assert query == f"\nassert {names[-1]} =="
        assert tokenizer.decode(sample.tokens[sample.answer_start:]) == sample.answer


def test_make_samples_names_a_bad_argument(tokenizer, stream):
    with pytest.raises(ValueError, match=r"depth 1.5 is not in \[0, 1\]"):
        context_tasks.make_samples(context_tasks.NIAH, tokenizer, stream, 64, 1.5, 1, seed=0)
    with pytest.raises(ValueError, match=r"task 'copy' is not one of"):
        context_tasks.make_samples("copy", tokenizer, stream, 64, 0.5, 1, seed=0)
    with pytest.raises(ValueError, match=r"length 20 is too short for the sample's facts and query \(\d+ ids\)"):
        context_tasks.make_samples(context_tasks.NIAH, tokenizer, stream, 20, 0.5, 1, seed=0,
                                   needles=4)


def test_exact_match_is_right_for_a_copying_predictor_and_wrong_otherwise(tokenizer, stream):
    samples = context_tasks.make_samples(context_tasks.NIAH, tokenizer, stream, 64, 0.5, 5,
                                         seed=1, needles=2)
    rows = np.stack([s.tokens for s in samples])
    starts = np.asarray([s.answer_start for s in samples])
    vocab = tokenizer.vocab_size

    def perfect(params, tokens):  # the next id everywhere: every answer copied
        del params
        return jax.numpy.roll(tokens, -1, axis=1), 0.01 * tokens[:, 1:].astype(np.float32)

    def off_by_one(params, tokens):  # never the next id
        predictions, nll = perfect(params, tokens)
        return (predictions + 1) % vocab, nll

    # 5 rows in batches of 2: the last batch is padded, and each row keeps its own output.
    predictions, nll = context_scoring.run_rows(jax.jit(perfect), None, rows, 2)
    np.testing.assert_allclose(nll, 0.01 * rows[:, 1:], rtol=1e-6)  # float32 products
    assert context_scoring.answers_correct(predictions, rows, starts).all()
    np.testing.assert_allclose(context_scoring.answer_loss(nll, starts),
                               [nll[i, starts[i] - 1:].mean() for i in range(5)], rtol=1e-6)
    wrong, _ = context_scoring.run_rows(jax.jit(off_by_one), None, rows, 2)
    assert not context_scoring.answers_correct(wrong, rows, starts).any()
    # Only the answer counts: a wrong prediction before it changes nothing, one in it fails.
    edited = predictions.copy()
    edited[0, starts[0] - 2] += 1
    edited[1, rows.shape[1] - 2] += 1  # predicts the answer's last id
    assert context_scoring.answers_correct(edited, rows, starts).tolist() == [
        True, False, True, True, True]


def test_bucket_edges_are_log_spaced():
    assert context_scoring.bucket_edges(512, 4) == [0, 64, 128, 256, 512]
    assert context_scoring.bucket_edges(96, 3) == [0, 24, 48, 96]
    assert context_scoring.bucket_edges(4, 5) == [0, 1, 2, 4]
    assert context_scoring.bucket_edges(64, 1) == [0, 64]


def test_bucket_perplexity_equals_a_direct_per_token_computation(micro_model):
    _, model, params = micro_model
    rows = np.random.default_rng(2).integers(0, 320, (3, 32)).astype(np.int32)
    forward = context_scoring.forward_fn(model)
    predictions, nll = context_scoring.run_rows(forward, params, rows, 2)
    logits = np.asarray(jax.jit(model.apply)({"params": params}, rows).logits, np.float64)
    shifted = logits - logits.max(-1, keepdims=True)
    logp = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    direct = -np.take_along_axis(logp[:, :-1], rows[:, 1:, None], axis=-1)[..., 0]  # [3, 31]
    np.testing.assert_allclose(nll, direct, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(predictions, logits.argmax(-1))
    edges = context_scoring.bucket_edges(32, 3)  # [0, 8, 16, 32]
    expected = [np.exp(direct[:, 0:7].mean()), np.exp(direct[:, 7:15].mean()),
                np.exp(direct[:, 15:31].mean())]
    np.testing.assert_allclose(context_scoring.bucket_perplexity(nll, edges), expected,
                               rtol=1e-5)


@pytest.fixture(scope="module", name="checkpoint")
def fixture_checkpoint(tmp_path_factory, micro_model, corpus_dir):
    """A workdir as a micro pretraining run leaves it: config.json (trained at 64 tokens, held-out
    text in corpus/eval) and export/ with randomly initialised parameters."""
    config, model, params = micro_model
    workdir = tmp_path_factory.mktemp("long_context_run")
    (workdir / "config.json").write_text(config.to_json_best_effort())
    export_params(workdir / "export", params, model.config, corpus_dir / "tokenizer.json")
    return workdir


def _command(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mimo_jax.eval.long_context", *args],
                          cwd=REPO, capture_output=True, text=True, timeout=300, check=False)


def test_command_writes_the_table_json_and_heat_map(checkpoint, tmp_path):
    out = _command("--checkpoint", str(checkpoint), "--lengths", "64,128", "--depths", "0.2,0.8",
                   "--samples", "2", "--needles", "2", "--buckets", "3", "--batch_size", "4",
                   "--out", str(tmp_path))
    assert out.returncode == 0, out.stderr
    results = json.loads((tmp_path / "long_context.json").read_text())
    assert results["trained_length"] == 64 and results["lengths"] == [64, 128]
    assert results["depths"] == [0.2, 0.8]
    for task in context_tasks.TASKS:
        assert list(results["accuracy"][task]) == ["64", "128"]
        for cells in results["accuracy"][task].values():
            assert list(cells) == ["0.2", "0.8"]
            assert all(v in (0.0, 0.5, 1.0) for v in cells.values())
        # Random parameters: about log(320) = 5.8 nats per answer id.
        assert all(4 < v < 8 for v in results["answer_loss"][task].values())
    assert results["perplexity"]["64"]["edges"] == [0, 16, 32, 64]
    for length, entry in results["perplexity"].items():
        # Randomly initialised: close to uniform over the 320 ids, never better than 1.
        assert entry["rows"] > 0 or entry["perplexity"] is None
        if entry["perplexity"] is not None:
            assert all(100 < p < 1000 for p in entry["perplexity"]), (length, entry)
    assert (tmp_path / "long_context.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "niah_multi: exact-match accuracy by length x depth" in out.stdout
    assert "held-out perplexity by position bucket" in out.stdout


@pytest.mark.parametrize("args,message", [
    (["--lengths", "64,x"], "error: --lengths='64,x': 'x' is not an integer"),
    (["--lengths", "64,0"], "error: --lengths=0 must be at least 1"),
])
def test_bad_arguments_stop_with_one_line(checkpoint, args, message):
    out = _command("--checkpoint", str(checkpoint), *args)
    assert out.returncode == 1
    assert out.stderr.strip().splitlines() == [message]


def test_a_missing_checkpoint_stops_with_one_line(tmp_path):
    out = _command("--checkpoint", str(tmp_path / "nothing"))
    assert out.returncode == 1
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        f"error: checkpoint {str(tmp_path / 'nothing')!r} has no params export")


def test_default_lengths_need_the_run_config(checkpoint):
    assert context_eval.CONFIG_FILE == trainer.CONFIG_FILE
    assert context_eval.default_lengths(context_eval.run_config(checkpoint)) == [64, 128, 256]
    assert context_eval.run_config(checkpoint / "export")["data"]["seq_len"] == 64
    with pytest.raises(ValueError, match="give --lengths"):
        context_eval.default_lengths(None)
