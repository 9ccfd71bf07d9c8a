"""The full MiMo-V2-Flash: 309B parameters, 15B active per token (SPEC.md)."""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    """Every architecture number of the report; training numbers of the 32k pre-training stage."""
    config = ml_collections.ConfigDict()
    config.model = model = ml_collections.ConfigDict()
    model.vocab_size = 152_576
    model.hidden_size = 4096
    model.num_layers = 48
    # Layer 0 and every 6th layer after it are global (0, 5, 11, ..., 47); the rest slide.
    model.global_period = 6
    model.layer_types = ""  # explicit comma-separated override, e.g. "global,sliding,..."
    model.num_dense_layers = 1
    model.mlp_types = ""
    model.sliding = ml_collections.ConfigDict(dict(
        num_heads=64, num_kv_heads=8, qk_head_dim=192, v_head_dim=128, rope_dim=64,
        rope_theta=10_000.0,
        # Keys a query sees, itself included: the query and the 128 tokens before it.
        sliding_window=129,
        attention_sink=True))
    model.full = ml_collections.ConfigDict(dict(
        num_heads=64, num_kv_heads=4, qk_head_dim=192, v_head_dim=128, rope_dim=64,
        rope_theta=640_000.0,  # 5_000_000.0 after the 256k context extension
        sliding_window=ml_collections.FieldReference(None, field_type=int),
        attention_sink=False))
    model.value_scale = 0.707
    model.dense_intermediate_size = 16_384
    model.moe_intermediate_size = 2048
    model.num_experts = 256
    model.num_experts_per_token = 8
    model.routed_scaling_factor = 1.0
    model.norm_eps = 1e-5
    model.init_std = 0.006
    model.num_mtp_heads = 1  # 3 for post-training and speculative decoding
    model.param_dtype = "float32"
    model.dtype = "bfloat16"
    model.attention_impl = "auto"
    model.attention_chunk_size = 128
    model.moe_impl = "ragged"
    model.scan_layers = True
    model.remat_policy = "full"
    return config
