"""Test setup: CPU only, 8 simulated devices, float32 matmuls at full precision."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in flags:
    os.environ["XLA_FLAGS"] = (flags + " --xla_force_host_platform_device_count=8").strip()

import jax  # noqa: E402  (must follow the environment set-up above)

jax.config.update("jax_default_matmul_precision", "highest")

import dataclasses  # noqa: E402

import pytest  # noqa: E402

from configs import tiny  # noqa: E402
from mimo_jax.config import ModelConfig, model_config_from_dict  # noqa: E402


def small_model_config(**overrides) -> ModelConfig:
    """configs/tiny.py shrunk for fast tests: 4 layers (global, 2 sliding, global), window 9,
    float32, 8 experts top-2, vocab 512. Keyword overrides replace ModelConfig fields."""
    cfg = tiny.get_config().model
    cfg.num_layers = 4
    cfg.global_period = 4
    cfg.vocab_size = 512
    cfg.hidden_size = 64
    cfg.sliding.update(num_heads=4, num_kv_heads=2, qk_head_dim=24, v_head_dim=16, rope_dim=8,
                       sliding_window=9)
    cfg.full.update(num_heads=4, num_kv_heads=1, qk_head_dim=24, v_head_dim=16, rope_dim=8)
    cfg.dense_intermediate_size = 128
    cfg.moe_intermediate_size = 32
    cfg.num_experts = 8
    cfg.num_experts_per_token = 2
    cfg.attention_chunk_size = 8
    config = model_config_from_dict(cfg)
    return dataclasses.replace(config, **overrides).validate() if overrides else config


@pytest.fixture(name="small_config", scope="session")
def fixture_small_config():
    """The factory `small_model_config` as a fixture."""
    return small_model_config
