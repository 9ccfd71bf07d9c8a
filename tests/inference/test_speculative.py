"""MTP self-speculative decoding: exactly plain greedy when greedy, the model's distribution when
sampling."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mimo_jax.inference.generation import generate
from mimo_jax.inference.sampling import SamplingConfig, probabilities
from mimo_jax.inference.speculative import speculative_generate
from mimo_jax.model.transformer import MiMoV2Flash

LENGTHS = [23, 5, 14]
NEW_TOKENS = 40


def _successor_params(model, random_params, wrong_tokens):
    """A model whose greedy continuation of token t is t + 1 (mod V), on top of random weights:
    the embedding and LM head carry a strong one-hot successor map. The MTP heads pass the token
    they read straight through `eh_proj`, so head h at position j predicts t_{j+h} + 1 = t_{j+h+1}:
    every draft is right, except that head 2 misreads the tokens in `wrong_tokens`."""
    params = random_params(model, 3)
    vocab, dim = model.config.vocab_size, model.config.hidden_size
    assert dim >= vocab
    one_hot = np.eye(vocab, dim)
    params["embed"]["embedding"] = jnp.asarray(3 * one_hot) + params["embed"]["embedding"]
    successor = np.roll(one_hot, 1, axis=0).T  # [D, V]: column v reads dim v - 1
    params["lm_head"]["kernel"] = jnp.asarray(successor) + params["lm_head"]["kernel"]
    for head in range(model.config.num_mtp_heads):
        eh = np.asarray(params[f"mtp_{head}"]["eh_proj"]).copy()
        through = np.eye(dim)
        if head == 1:
            for t in wrong_tokens:
                through[t] = np.roll(through[t], 5)
        eh[:dim] += through
        params[f"mtp_{head}"]["eh_proj"] = jnp.asarray(eh)
    return params


@pytest.mark.parametrize("weights", ["random", "successor"])
def test_greedy_speculative_equals_plain_greedy(decode_model, random_params, prompts, weights):
    model, params = decode_model
    if weights == "successor":
        params = _successor_params(model, random_params, wrong_tokens=range(0, 64, 3))
    tokens, lengths = prompts(LENGTHS, model.config.vocab_size, seed=1)
    plain = generate(model, params, tokens, lengths, max_new_tokens=NEW_TOKENS, prefill_chunk=8)
    spec = speculative_generate(model, params, tokens, lengths, max_new_tokens=NEW_TOKENS,
                                num_draft=3, prefill_chunk=8)
    for row in range(len(LENGTHS)):
        assert spec.generated(row) == plain.generated(row), f"row {row}"
    np.testing.assert_array_equal(spec.lengths, plain.lengths)
    acceptance = spec.acceptance_length()
    if weights == "successor":
        for row in range(len(LENGTHS)):
            out = plain.generated(row)
            assert all(b == (a + 1) % 64 for a, b in zip(out, out[1:]))
        # Head 2 is wrong on a third of the tokens, so steps keep 2 or 4 tokens (3 when a
        # row stops), never 1.
        assert 2.5 < acceptance < 3.8
        assert np.all(spec.steps < NEW_TOKENS / 2)
    else:
        assert 1.0 < acceptance < 2.0  # random heads: mostly rejected, sometimes right


def test_speculative_stop_tokens_cut_inside_a_step(decode_model, random_params, prompts):
    """A stop token among a step's accepted drafts ends the row right there, as in plain
    decoding; the other rows go on."""
    model, _ = decode_model
    params = _successor_params(model, random_params, wrong_tokens=())
    tokens, lengths = prompts(LENGTHS, model.config.vocab_size, seed=1)
    stop = (int(tokens[1, LENGTHS[1] - 1]) + 6) % 64  # row 1's 6th new token
    kwargs = dict(max_new_tokens=NEW_TOKENS, prefill_chunk=8, stop_tokens=(stop,))
    plain = generate(model, params, tokens, lengths, **kwargs)
    spec = speculative_generate(model, params, tokens, lengths, num_draft=3, **kwargs)
    assert len(plain.generated(1)) == 6 and plain.generated(1)[-1] == stop
    for row in range(len(LENGTHS)):
        assert spec.generated(row) == plain.generated(row)
    np.testing.assert_array_equal(spec.num_generated, plain.num_generated)


def _exact_distribution(model, params, prompt, sampling, new_tokens):
    """p(t_1 .. t_n | prompt) for every sequence of n tokens, by running the full forward on all
    of them. Returns [V] * n probabilities."""
    vocab = model.config.vocab_size
    sequences = np.asarray(list(itertools.product(range(vocab), repeat=new_tokens)), np.int32)
    full = np.concatenate([np.broadcast_to(prompt, (len(sequences), len(prompt))), sequences], 1)
    logits = jax.jit(lambda p, t: model.apply({"params": p}, t).logits)(params, jnp.asarray(full))
    probs = np.asarray(probabilities(logits[:, len(prompt) - 1:-1], sampling), np.float64)
    step = np.take_along_axis(probs, sequences[..., None], axis=-1)[..., 0]  # [V^n, n]
    return np.prod(step, axis=1).reshape((vocab,) * new_tokens)


def _chi_square_p_value(counts: np.ndarray, expected: np.ndarray) -> float:
    """Pearson's test, cells with expected count < 5 pooled into one."""
    counts, expected = counts.ravel(), expected.ravel()
    small = expected < 5
    counts = np.append(counts[~small], counts[small].sum())
    expected = np.append(expected[~small], expected[small].sum())
    keep = expected > 0
    assert np.all(counts[~keep] == 0), "a sample the model gives probability zero"
    statistic = np.sum((counts[keep] - expected[keep]) ** 2 / expected[keep])
    dof = keep.sum() - 1
    return float(jax.scipy.special.gammaincc(dof / 2, statistic / 2))  # the chi-square tail


def test_speculative_sampling_has_the_model_distribution(decode_config, random_params):
    """4000 sampled continuations of 4 tokens with 2 drafts per step, against the exact
    distribution that plain sampling draws from (`probabilities` of the full forward, enumerated
    over every continuation): each position's marginal and the joint of consecutive pairs."""
    model = MiMoV2Flash(decode_config(vocab_size=8, init_std=0.25))
    params = random_params(model, 5)
    sampling = SamplingConfig(temperature=1.0, top_k=6)
    prompt = np.asarray([3, 1, 4, 1, 5], np.int32)
    new, rows = 4, 4000
    exact = _exact_distribution(model, params, prompt, sampling, new)
    assert exact.max() > 0.05 and np.sum(exact == 0) > 0  # peaked, and top-k matters
    spec = speculative_generate(model, params, np.broadcast_to(prompt, (rows, len(prompt))),
                                np.full((rows,), len(prompt), np.int32), max_new_tokens=new,
                                num_draft=2, sampling=sampling, rng=jax.random.key(12))
    assert 1.1 < spec.acceptance_length() < 2.5  # drafts are both kept and rejected
    np.testing.assert_array_equal(spec.num_generated, new)
    samples = np.asarray(spec.tokens[:, len(prompt):len(prompt) + new])
    for i in range(new):
        marginal = exact.sum(axis=tuple(a for a in range(new) if a != i))
        counts = np.bincount(samples[:, i], minlength=8)
        assert _chi_square_p_value(counts, rows * marginal) > 1e-3, i
    for i in range(new - 1):
        pair = exact.sum(axis=tuple(a for a in range(new) if a not in (i, i + 1)))
        counts = np.zeros((8, 8))
        np.add.at(counts, (samples[:, i], samples[:, i + 1]), 1)
        assert _chi_square_p_value(counts, rows * pair) > 1e-3, (i, i + 1)


def test_bad_draft_count_is_rejected(decode_model):
    model, params = decode_model
    with pytest.raises(ValueError, match="num_draft=4"):
        speculative_generate(model, params, np.zeros((1, 3), np.int32), np.asarray([3]),
                             max_new_tokens=2, num_draft=4)
