"""configs/tiny.py shrunk further for tests: one builder and the sizes the test suites share."""

from configs import tiny
from mimo_jax.config import ModelConfig, model_config_from_dict

# 4 layers (global, 2 sliding in one scanned run, global), window 9, 8 experts top-2, vocab 512.
SMALL = {
    "num_layers": 4, "global_period": 4, "vocab_size": 512, "hidden_size": 64,
    "sliding.num_heads": 4, "sliding.num_kv_heads": 2, "sliding.qk_head_dim": 24,
    "sliding.v_head_dim": 16, "sliding.rope_dim": 8, "sliding.sliding_window": 9,
    "full.num_heads": 4, "full.num_kv_heads": 1, "full.qk_head_dim": 24, "full.v_head_dim": 16,
    "full.rope_dim": 8, "dense_intermediate_size": 128, "moe_intermediate_size": 32,
    "num_experts": 8, "num_experts_per_token": 2, "runtime.attention_chunk_size": 8,
}


def tiny_model(overrides: dict) -> ModelConfig:
    """configs/tiny.py's model section with dotted-key overrides (e.g. {"sliding.num_heads": 2}),
    validated."""
    cfg = tiny.get_config().model
    cfg.update_from_flattened_dict(overrides)
    return model_config_from_dict(cfg)
