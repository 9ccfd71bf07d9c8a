"""The reference the parity tests compare with: a tiny random transformers
`MiMoV2FlashForCausalLM`, saved with `save_pretrained` for `mimo_jax.convert.hf.load` to read."""

import torch
from transformers import MiMoV2FlashConfig, MiMoV2FlashForCausalLM

WINDOW = 9  # keys a query sees, itself included


def tiny_config(vocab_size: int) -> MiMoV2FlashConfig:
    """4 layers whose runs are GA dense, 2 x SWA MoE (one scanned run), GA MoE; 8 experts top-2."""
    config = MiMoV2FlashConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=1, head_dim=48, v_head_dim=32,
        moe_intermediate_size=24, n_routed_experts=8, num_experts_per_tok=2,
        sliding_window=WINDOW, max_position_embeddings=256, initializer_range=0.08,
        layer_types=["full_attention", "sliding_attention", "sliding_attention",
                     "full_attention"],
        rope_parameters={
            "full_attention": {"rope_type": "default", "rope_theta": 50_000.0,
                               "partial_rotary_factor": 0.334},
            "sliding_attention": {"rope_type": "default", "rope_theta": 1_000.0,
                                  "partial_rotary_factor": 0.334}})
    config._attn_implementation = "eager"  # the sink-aware attention
    return config


def random_model(config: MiMoV2FlashConfig, directory: str) -> MiMoV2FlashForCausalLM:
    """A seeded random model in eval mode, saved to `directory`."""
    torch.manual_seed(0)
    model = MiMoV2FlashForCausalLM(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("sinks"):
                param.normal_(0.0, 1.0)  # sinks that matter: logits near the attention scores
        for name, buf in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.normal_(0.0, 0.05)  # large enough to change which experts are chosen
    model.save_pretrained(directory)
    return model
