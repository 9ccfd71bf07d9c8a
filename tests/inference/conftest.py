"""Shared models for the decoding tests: the shrunk tiny config with 3 MTP heads, in float32."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import model_configs
from mimo_jax.config import ModelConfig
from mimo_jax.inference import decode
from mimo_jax.model.transformer import MiMoV2Flash, init_params


def decode_config(**overrides) -> ModelConfig:
    """`model_configs.SMALL` (4 layers: GA dense, 2 SWA MoE in one scanned run, GA MoE; window 9,
    8 experts top-2) with 3 MTP heads, vocab 64, float32. Overrides replace `model.*` keys."""
    return model_configs.tiny_model({**model_configs.SMALL, "vocab_size": 64, "num_mtp_heads": 3,
                                     "init_std": 0.06, **overrides})


def random_params(model: MiMoV2Flash, seed: int) -> dict:
    """Parameters drawn with numpy in the shapes of `init_params` (which would compile for tens of
    seconds): normal(0, init_std) weights, norm scales near 1, sinks and router biases nonzero."""
    rng = np.random.default_rng(seed)
    std = model.config.init_std
    shapes = jax.eval_shape(lambda: init_params(model, jax.random.key(0)))

    def draw(path, leaf):
        name = jax.tree_util.keystr(path)
        if "scale" in name:
            value = 1 + 0.1 * rng.normal(size=leaf.shape)
        elif "sinks" in name or "e_score_correction_bias" in name:
            value = 0.5 * rng.normal(size=leaf.shape)
        else:
            value = std * rng.normal(size=leaf.shape)
        return jnp.asarray(value, leaf.dtype)
    return jax.tree_util.tree_map_with_path(draw, shapes)


@pytest.fixture(scope="session")
def decode_model():
    """(model, params) of `decode_config()`; weights a little larger than the usual init so
    that argmax margins are wide."""
    model = MiMoV2Flash(decode_config())
    return model, random_params(model, 0)


@pytest.fixture(name="random_params", scope="session")
def fixture_random_params():
    """The function `random_params` as a fixture."""
    return random_params


@pytest.fixture(name="decode_config", scope="session")
def fixture_decode_config():
    """The factory `decode_config` as a fixture."""
    return decode_config


@pytest.fixture(name="prompts", scope="session")
def fixture_prompts():
    """A factory of random right-padded prompts: prompts(lengths, vocab, seed) ->
    (tokens [B, max(lengths)] int32, lengths [B] int32); the padding holds random junk."""
    def make(lengths: list[int], vocab: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng(seed)
        tokens = rng.integers(0, vocab, (len(lengths), max(lengths))).astype(np.int32)
        return tokens, np.asarray(lengths, np.int32)
    return make


@pytest.fixture(name="logits_step", scope="session")
def fixture_logits_step():
    """A factory: logits_step(model) is a jitted cached forward over a chunk that returns its
    logits and the new cache."""
    def make(model):
        def step(params, tokens, positions, cache):
            hidden, cache = decode.model_decode(model, params, tokens, positions, cache)
            return decode.logits(model, params, hidden), cache
        return jax.jit(step)
    return make
