"""Rollouts for on-policy training: sampling log-probs and routed experts against a full forward,
routing replay (R3) against the unreplayed model (values and gradients), token scoring.

Every test shares the module's rollouts and two compiled scoring forwards (one without replay,
one with), so the file compiles 3 generations, 2 forwards and 2 gradients.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mimo_jax.config import replace_model, with_runtime
from mimo_jax.inference import SamplingConfig, rollout, score_tokens
from mimo_jax.inference.sampling import filter_logits
from mimo_jax.model import layout
from mimo_jax.model.transformer import MiMoV2Flash
from mimo_jax.ops import moe as moe_ops

PROMPT_LENGTHS = [9, 4]
SAMPLES = 3  # per prompt
NEW_TOKENS = 12
STOPS = (1, 2, 3, 4, 5)  # common enough in a vocabulary of 64 that some rows stop early
SAMPLING = {
    "temperature_1": SamplingConfig(temperature=1.0),
    "temperature_0.7_top_p_0.9": SamplingConfig(temperature=0.7, top_p=0.9),
    "greedy": SamplingConfig(),
}
SCORE_TEMPERATURE = 0.7


@pytest.fixture(scope="module", name="rollouts")
def fixture_rollouts(decode_model, prompts):
    """Rollouts of the same prompts under each sampling config. The greedy one decodes through
    the scanned layer stack (`unstack_layers=False`), the others one module per layer."""
    model, params = decode_model
    tokens, lengths = prompts(PROMPT_LENGTHS, model.config.vocab_size, seed=4)
    return {name: rollout(model, params, tokens, lengths, samples_per_prompt=SAMPLES,
                          max_new_tokens=NEW_TOKENS, sampling=sampling, rng=jax.random.key(7),
                          stop_tokens=STOPS, unstack_layers=(name != "greedy"))
            for name, sampling in SAMPLING.items()}


@pytest.fixture(scope="module", name="scorers")
def fixture_scorers(decode_model):
    """(plain, replaying): jitted `score_tokens` with its `ModelOutput`. plain takes segment ids
    and scores at SCORE_TEMPERATURE; replaying takes lengths and a routing to replay."""
    model, _ = decode_model
    plain = jax.jit(lambda p, t, s: score_tokens(model, p, t, segment_ids=s,
                                                 temperature=SCORE_TEMPERATURE, with_output=True))
    replaying = jax.jit(lambda p, t, n, r: score_tokens(model, p, t, lengths=n, routing=r,
                                                        with_output=True))
    return plain, replaying


def _segments(out):
    """[B, S] int32: 1 on each row's tokens, 0 on padding."""
    columns = np.arange(out.tokens.shape[1])[None]
    return (columns < np.asarray(out.lengths)[:, None]).astype(np.int32)


def _full_forward(decode_model, scorers, out):
    """The unreplayed full forward over a rollout's rows: (scores, ModelOutput)."""
    _, params = decode_model
    return scorers[0](params, out.tokens, jnp.asarray(_segments(out)))


@pytest.mark.parametrize("name", list(SAMPLING))
def test_sampling_log_probs_equal_recomputation_from_full_forward(decode_model, rollouts,
                                                                  scorers, name):
    out = rollouts[name]
    _, forward = _full_forward(decode_model, scorers, out)
    logits = np.asarray(forward.logits[:, :-1])  # logits[t - 1] drew tokens[t]
    tokens = np.asarray(out.tokens)
    mask = np.asarray(out.response_mask).astype(bool)
    sampling = SAMPLING[name]
    if sampling.greedy:
        expected = np.zeros(tokens.shape, np.float32)
        np.testing.assert_array_equal(tokens[:, 1:][mask[:, 1:]],
                                      logits.argmax(-1)[mask[:, 1:]])
    else:
        log_mu = np.asarray(jax.nn.log_softmax(filter_logits(jnp.asarray(logits), sampling)))
        expected = np.take_along_axis(log_mu, tokens[:, 1:, None], -1)[..., 0]
        expected = np.where(mask, np.pad(expected, ((0, 0), (1, 0))), 0.0)
        assert np.all(np.isfinite(expected)) and expected[mask].max() < 0
    if name == "temperature_1":  # no filter: the model's own distribution
        plain = np.asarray(jax.nn.log_softmax(jnp.asarray(logits)))
        plain = np.take_along_axis(plain, tokens[:, 1:, None], -1)[..., 0]
        np.testing.assert_allclose(expected[:, 1:][mask[:, 1:]], plain[mask[:, 1:]], atol=1e-6)
    np.testing.assert_allclose(np.asarray(out.logprobs), expected, atol=1e-5)


@pytest.mark.parametrize("name", list(SAMPLING))
def test_rollout_routing_equals_full_forward_routing(decode_model, rollouts, scorers, name):
    """The cached decoder picks the same experts as the uncached forward on every token a forward
    ran (the router's top-k margins here are far wider than the 1e-6 the two paths differ by);
    padding and each row's last token hold -1."""
    out = rollouts[name]
    _, forward = _full_forward(decode_model, scorers, out)
    config = decode_model[0].config
    routing = np.asarray(out.routing)
    assert routing.shape == out.tokens.shape + (len(config.moe_layers),
                                                config.num_experts_per_token)
    ran = _segments(out).astype(bool)
    ran[np.arange(len(ran)), np.asarray(out.lengths) - 1] = False
    np.testing.assert_array_equal(routing[ran], np.asarray(forward.routing)[ran])
    assert np.all(routing[~ran] == -1)
    assert np.all((routing[ran] >= 0) & (routing[ran] < config.num_experts))


def test_rollout_rows_masks_and_stops(decode_model, rollouts, prompts):
    model, _ = decode_model
    tokens, lengths = prompts(PROMPT_LENGTHS, model.config.vocab_size, seed=4)
    out = rollouts["temperature_1"]
    rows = len(PROMPT_LENGTHS) * SAMPLES
    assert out.tokens.shape == (rows, max(PROMPT_LENGTHS) + NEW_TOKENS)
    expected_prompt = np.repeat(lengths, SAMPLES)
    np.testing.assert_array_equal(out.prompt_lengths, expected_prompt)
    got = np.asarray(out.tokens)
    mask = np.asarray(out.response_mask)
    for row in range(rows):
        start, end = expected_prompt[row], int(out.lengths[row])
        np.testing.assert_array_equal(got[row, :start], tokens[row // SAMPLES, :start])
        np.testing.assert_array_equal(mask[row], (np.arange(got.shape[1]) >= start)
                                      & (np.arange(got.shape[1]) < end))
        response = got[row, start:end].tolist()
        stopped = [t in STOPS for t in response]
        # A response ends at its first stop token (kept), or after NEW_TOKENS tokens.
        assert stopped.count(True) <= 1 and (not any(stopped) or stopped[-1])
        assert any(stopped) or len(response) == NEW_TOKENS
    lengths_out = np.asarray(out.lengths) - expected_prompt
    assert lengths_out.min() < NEW_TOKENS == lengths_out.max()  # some rows stopped early
    # Samples of one prompt differ from each other, and log mu is 0 off the response.
    first = [tuple(got[row, expected_prompt[row]:]) for row in range(SAMPLES)]
    assert len(set(first)) == SAMPLES
    assert np.all(np.asarray(out.logprobs)[mask == 0] == 0)


def test_score_tokens_equals_log_softmax_of_full_forward_logits(decode_model, rollouts, scorers):
    out = rollouts["temperature_0.7_top_p_0.9"]
    scores, forward = _full_forward(decode_model, scorers, out)
    log_p = np.asarray(jax.nn.log_softmax(forward.logits / SCORE_TEMPERATURE))  # [B, S, V]
    tokens = np.asarray(out.tokens)
    segments = _segments(out)
    expected = np.zeros(tokens.shape, np.float32)
    for row in range(len(tokens)):
        for t in range(1, int(out.lengths[row])):
            expected[row, t] = log_p[row, t - 1, tokens[row, t]]
    assert segments.min() == 0  # some rows are padded, and their padding scores 0
    np.testing.assert_allclose(np.asarray(scores), expected, atol=1e-5)


def test_replaying_the_rollout_routing_scores_like_the_unreplayed_forward(decode_model, rollouts,
                                                                          scorers):
    """The student's recompute with the rollout's routing replayed; the routing agrees with the
    router's (the last token's -1 lets the router choose), so nothing changes and no choice is
    mismatched."""
    _, params = decode_model
    out = rollouts["temperature_1"]
    _, forward = _full_forward(decode_model, scorers, out)
    scores, replayed = scorers[1](params, out.tokens, out.lengths, out.routing)
    log_p = jax.nn.log_softmax(forward.logits[:, :-1])
    expected = jnp.take_along_axis(log_p, out.tokens[:, 1:, None], -1)[..., 0]
    segments = _segments(out)
    expected = np.where(segments[:, 1:] > 0, np.asarray(expected), 0.0)
    np.testing.assert_allclose(np.asarray(scores[:, 1:]), expected, atol=1e-5)
    np.testing.assert_allclose(np.asarray(replayed.logits), np.asarray(forward.logits), atol=1e-5)
    mismatched, counted = moe_ops.replay_mismatch(out.routing, replayed.router_choice,
                                                  out.response_mask)
    assert float(mismatched) == 0 and float(counted) > 0


def test_replaying_another_routing_changes_output_and_counts_mismatch(decode_model, rollouts,
                                                                      scorers):
    _, params = decode_model
    config = decode_model[0].config
    out = rollouts["temperature_1"]
    _, forward = _full_forward(decode_model, scorers, out)
    segments = _segments(out)
    shape = out.routing.shape
    rng = np.random.default_rng(11)
    # k distinct random experts per token and layer; a few tokens left to the router (-1).
    routing = np.argsort(rng.random(shape[:3] + (config.num_experts,)), -1)[..., :shape[3]]
    unrecorded = rng.random(shape[:3]) < 0.2
    routing = np.where(unrecorded[..., None], -1, routing).astype(np.int32)

    # All -1: every token keeps the router's choice, exactly the unreplayed forward.
    _, fallback = scorers[1](params, out.tokens, out.lengths, jnp.full(shape, -1, jnp.int32))
    np.testing.assert_allclose(np.asarray(fallback.logits), np.asarray(forward.logits),
                               atol=1e-5)

    _, replayed = scorers[1](params, out.tokens, out.lengths, jnp.asarray(routing))
    real = segments.astype(bool)
    moved = np.abs(np.asarray(replayed.logits) - np.asarray(forward.logits))[real].max()
    assert moved > 1e-2
    # The experts run are the replayed ones where recorded, the router's own elsewhere.
    used, chosen = np.asarray(replayed.routing), np.asarray(replayed.router_choice)
    recorded = real[..., None] & ~unrecorded
    np.testing.assert_array_equal(used[recorded], routing[recorded])
    np.testing.assert_array_equal(used[real[..., None] & unrecorded],
                                  chosen[real[..., None] & unrecorded])
    # The first MoE layer's router sees the same input as without replay.
    np.testing.assert_array_equal(chosen[real][:, 0], np.asarray(forward.router_choice)[real][:, 0])

    mismatched, counted = moe_ops.replay_mismatch(jnp.asarray(routing), replayed.router_choice,
                                                  jnp.asarray(segments))
    expected_mismatched = expected_counted = 0
    for b, t, layer in zip(*np.nonzero(recorded)):
        expected_counted += shape[3]
        expected_mismatched += sum(e not in chosen[b, t, layer] for e in routing[b, t, layer])
    assert float(counted) == expected_counted
    assert float(mismatched) == expected_mismatched
    assert 0.5 < expected_mismatched / expected_counted < 1  # random experts mostly disagree


@pytest.mark.parametrize("moe_impl,scan_layers,remat_policy",
                         [("dense", True, "full"), ("ragged", False, "none")])
def test_replaying_the_routers_own_choice_keeps_values_and_gradients(
        decode_model, moe_impl, scan_layers, remat_policy):
    """Gradients of every parameter, the router's included, through a replayed forward equal the
    unreplayed ones: the replayed experts are gated by the same renormalised sigmoid scores.
    (Reference attention: the smallest program to compile; attention is not what is tested.)"""
    base_model, base_params = decode_model
    config = with_runtime(replace_model(base_model.config, scan_layers=scan_layers),
                          moe_impl=moe_impl, remat_policy=remat_policy,
                          attention_impl="reference")
    model = MiMoV2Flash(config)
    params = dict(base_params)
    params["decoder"] = layout.stack_layers(
        layout.unstack_layers(base_params["decoder"], base_model.config), config, stack=jnp.stack)
    rng = np.random.default_rng(5)
    tokens = jnp.asarray(rng.integers(0, config.vocab_size, (2, 16)), jnp.int32)
    segments = jnp.asarray([[1] * 16, [1] * 11 + [0] * 5], jnp.int32)  # one row padded
    cotangent = jnp.asarray(rng.normal(size=(2, 16, config.vocab_size)), jnp.float32)

    def loss(params, routing):
        out = model.apply({"params": params}, tokens, segment_ids=segments, routing=routing)
        return jnp.sum(out.logits * cotangent) + out.balance_loss, out

    @jax.jit
    def both(params):
        (value, out), grads = jax.value_and_grad(lambda p: loss(p, None), has_aux=True)(params)
        (replayed_value, replayed), replayed_grads = jax.value_and_grad(
            lambda p: loss(p, out.routing), has_aux=True)(params)
        return value, out, grads, replayed_value, replayed, replayed_grads

    value, out, grads, replayed_value, replayed, replayed_grads = both(params)
    np.testing.assert_array_equal(np.asarray(replayed.routing), np.asarray(out.routing))
    np.testing.assert_allclose(np.asarray(replayed.logits), np.asarray(out.logits), atol=1e-5)
    np.testing.assert_allclose(float(replayed_value), float(value), rtol=1e-6)
    for got, want in zip(layout.unstack_layers(replayed_grads["decoder"], config),
                         layout.unstack_layers(grads["decoder"], config)):
        jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, atol=1e-5), got, want)
    jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, atol=1e-5),
                 replayed_grads["embed"], grads["embed"])
    router_grad = layout.unstack_layers(grads["decoder"], config)[1]["moe"]["router"]
    assert float(jnp.abs(router_grad).max()) > 1e-4  # the router does learn through the gates


def test_bad_routing_shape_names_the_shape(decode_model):
    model, params = decode_model
    tokens = jnp.zeros((2, 5), jnp.int32)
    with pytest.raises(ValueError, match=r"routing must have shape \(2, 5, 3, 2\)"):
        model.apply({"params": params}, tokens, routing=jnp.zeros((2, 5, 2, 2), jnp.int32))
    with pytest.raises(ValueError, match="samples_per_prompt=0"):
        rollout(model, params, tokens + 1, jnp.asarray([5, 5]), samples_per_prompt=0,
                max_new_tokens=2, sampling=SamplingConfig(), rng=jax.random.key(0))
