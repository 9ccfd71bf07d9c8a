"""MiMo-V2-Flash's architecture at CPU size: every mechanism of the full model, small numbers."""

import ml_collections

from configs import mimo_v2_flash


def get_config() -> ml_collections.ConfigDict:
    """8 layers (global at 0 and 5, the rest sliding), 16 experts top-4, 2 MTP heads."""
    config = mimo_v2_flash.get_config()
    model = config.model
    model.vocab_size = 4096
    model.hidden_size = 128
    model.num_layers = 8
    model.sliding.update(num_heads=4, num_kv_heads=2, qk_head_dim=48, v_head_dim=32, rope_dim=16,
                         sliding_window=33)
    model.full.update(num_heads=4, num_kv_heads=1, qk_head_dim=48, v_head_dim=32, rope_dim=16)
    model.dense_intermediate_size = 512
    model.moe_intermediate_size = 64
    model.num_experts = 16
    model.num_experts_per_token = 4
    model.init_std = 0.02
    model.num_mtp_heads = 2
    model.dtype = "float32"
    model.attention_chunk_size = 32
    model.moe_impl = "dense"
    model.remat_policy = "none"
    return config
