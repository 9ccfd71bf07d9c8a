"""The whole model: packing, padding, window edges, scan layout, dispatch backends, MTP heads."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mimo_jax.config import replace_model, with_runtime
from mimo_jax.model import layout
from mimo_jax.model.transformer import MiMoV2Flash, init_params


@pytest.fixture(scope="module", name="model_and_params")
def fixture_model_and_params(small_config):
    config = small_config()
    model = MiMoV2Flash(config)
    params = init_params(model, jax.random.PRNGKey(0))
    # Give the correction bias and sinks non-trivial values so the tests exercise them.
    params = jax.tree_util.tree_map_with_path(
        lambda path, x: x + 0.3 * jax.random.normal(jax.random.PRNGKey(len(path)), x.shape)
        if any(getattr(p, "key", None) in ("sinks", "e_score_correction_bias") for p in path)
        else x, params)
    return config, model, params


def _apply(model, params, tokens, segment_ids=None, return_mtp=False):
    return jax.jit(lambda p, t, s: model.apply({"params": p}, t, segment_ids=s,
                                               return_mtp=return_mtp))(params, tokens, segment_ids)


def test_packed_documents_equal_separate_runs(model_and_params):
    config, model, params = model_and_params
    rng = np.random.default_rng(0)
    lengths = (13, 20, 9)
    docs = [rng.integers(1, config.vocab_size, size=n) for n in lengths]
    packed = np.zeros((1, 48), np.int32)
    segments = np.zeros((1, 48), np.int32)
    start = 0
    for i, doc in enumerate(docs):
        packed[0, start:start + len(doc)] = doc
        segments[0, start:start + len(doc)] = i + 1
        start += len(doc)
    out = _apply(model, params, jnp.asarray(packed), jnp.asarray(segments), return_mtp=True)
    start = 0
    for doc in docs:
        alone = _apply(model, params, jnp.asarray(doc[None]), jnp.ones((1, len(doc)), jnp.int32),
                       return_mtp=True)
        sl = slice(start, start + len(doc))
        np.testing.assert_allclose(np.asarray(out.logits[0, sl]), np.asarray(alone.logits[0]),
                                   atol=1e-5)
        np.testing.assert_allclose(np.asarray(out.mtp_logits[:, 0, sl]),
                                   np.asarray(alone.mtp_logits[:, 0]), atol=1e-5)
        start += len(doc)


def test_padding_does_not_change_real_tokens(model_and_params):
    config, model, params = model_and_params
    tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 24), 1, config.vocab_size)
    segments = jnp.ones((2, 24), jnp.int32).at[:, 18:].set(0)
    out = _apply(model, params, tokens, segments)
    garbage = tokens.at[:, 18:].set(jax.random.randint(jax.random.PRNGKey(2), (2, 6), 1, 100))
    out2 = _apply(model, params, garbage, segments)
    np.testing.assert_allclose(np.asarray(out.logits[:, :18]), np.asarray(out2.logits[:, :18]),
                               atol=1e-6)
    np.testing.assert_allclose(np.asarray(out.expert_load), np.asarray(out2.expert_load))
    assert float(out.expert_load.sum()) == 2 * 18 * config.num_experts_per_token * 3


@pytest.mark.parametrize("window", [1, 5, 9])
def test_sliding_window_edge(small_config, window):
    """In a one-layer sliding model, the query at i sees keys i-W+1..i and nothing before."""
    config = small_config(num_layers=1, layer_types=("sliding",), mlp_types=("dense",),
                          num_mtp_heads=0,
                          sliding=dataclasses.replace(small_config().sliding,
                                                      sliding_window=window))
    model = MiMoV2Flash(config)
    params = init_params(model, jax.random.PRNGKey(3))
    tokens = jax.random.randint(jax.random.PRNGKey(4), (1, 20), 1, config.vocab_size)
    base = _apply(model, params, tokens).logits
    query = 15
    for key in (query - window, query - window + 1):
        changed = _apply(model, params, tokens.at[0, key].set((tokens[0, key] + 7) % 500)).logits
        moved = float(jnp.abs(changed[0, query] - base[0, query]).max())
        if key == query - window:
            assert moved == 0.0, f"key {key} is outside the window of {window} but changed {query}"
        else:
            assert moved > 1e-4, f"key {key} is inside the window of {window} but had no effect"


def test_scan_layout_and_backends_agree(model_and_params):
    config, model, params = model_and_params
    tokens = jax.random.randint(jax.random.PRNGKey(5), (2, 30), 1, config.vocab_size)
    segments = jnp.concatenate([jnp.ones((2, 12), jnp.int32), jnp.full((2, 14), 2, jnp.int32),
                                jnp.zeros((2, 4), jnp.int32)], axis=1)
    variants = [with_runtime(replace_model(config, scan_layers=False), moe_impl="ragged",
                             attention_impl="reference"),
                with_runtime(config, attention_impl="chunked", remat_policy="full")]

    def loss(model, params):
        out = model.apply({"params": params}, tokens, segment_ids=segments, return_mtp=True)
        return jnp.mean(out.logits ** 2) + jnp.mean(out.mtp_logits ** 2) + out.balance_loss

    base_loss, base_grads = jax.jit(jax.value_and_grad(lambda p: loss(model, p)))(params)
    base_layers = layout.unstack_layers(base_grads["decoder"], config)
    for variant in variants:
        vparams = dict(params)
        vparams["decoder"] = layout.stack_layers(layout.unstack_layers(params["decoder"], config),
                                                 variant)
        vloss, vgrads = jax.jit(jax.value_and_grad(
            lambda p, v=variant: loss(MiMoV2Flash(v), p)))(vparams)
        np.testing.assert_allclose(float(vloss), float(base_loss), rtol=1e-5)
        for got, want in zip(layout.unstack_layers(vgrads["decoder"], variant), base_layers):
            jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-3, atol=1e-6),
                         got, want)
        jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-3, atol=1e-6),
                     vgrads["mtp_0"], base_grads["mtp_0"])
    # No gradient reaches the correction bias: it is moved by the update rule alone.
    for layer in base_layers[1:]:
        assert float(jnp.abs(layer["moe"]["e_score_correction_bias"]).max()) == 0.0


def test_mtp_heads_read_shifted_tokens(model_and_params):
    config, model, params = model_and_params
    tokens = jax.random.randint(jax.random.PRNGKey(6), (1, 16), 1, config.vocab_size)
    base = _apply(model, params, tokens, jnp.ones((1, 16), jnp.int32), return_mtp=True)
    # Token 10 reaches MTP head k at position 10 - k (and later ones), never earlier positions.
    changed = _apply(model, params, tokens.at[0, 10].set(3), jnp.ones((1, 16), jnp.int32),
                     return_mtp=True)
    for k in range(config.num_mtp_heads):
        diff = np.abs(np.asarray(changed.mtp_logits[k, 0] - base.mtp_logits[k, 0])).max(-1)
        first = int(np.argmax(diff > 0))
        assert first == 10 - (k + 1), (k, diff)
