"""Shared models for the decoding tests: the shrunk tiny config with 3 MTP heads, in float32."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import tiny
from mimo_jax.config import ModelConfig, model_config_from_dict
from mimo_jax.model.transformer import MiMoV2Flash, init_params

WINDOW = 9  # keys a query sees, itself included


def decode_config(**overrides) -> ModelConfig:
    """configs/tiny.py shrunk: 4 layers (GA dense, 2 SWA MoE in one scanned run, GA MoE), window
    9, 8 experts top-2, 3 MTP heads, vocab 64, float32. Overrides replace `model.*` keys."""
    cfg = tiny.get_config().model
    cfg.update(num_layers=4, global_period=4, vocab_size=64, hidden_size=64,
               dense_intermediate_size=128, moe_intermediate_size=32, num_experts=8,
               num_experts_per_token=2, attention_chunk_size=8, num_mtp_heads=3, init_std=0.06)
    cfg.sliding.update(num_heads=4, num_kv_heads=2, qk_head_dim=24, v_head_dim=16, rope_dim=8,
                       sliding_window=WINDOW)
    cfg.full.update(num_heads=4, num_kv_heads=1, qk_head_dim=24, v_head_dim=16, rope_dim=8)
    cfg.update(overrides)
    return model_config_from_dict(cfg)


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
