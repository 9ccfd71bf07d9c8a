"""Flax Linen modules of MiMo-V2-Flash: layers, SWA/GA attention, MoE, MTP heads, the decoder.

    model = MiMoV2Flash(config)                          # config: mimo_jax.config.ModelConfig
    params = init_params(model, jax.random.key(0))
    out = model.apply({"params": params}, tokens)        # out.logits [B, T, V]
    print(summary(config))                               # parameters per component

Modules: `transformer` (the model, its decoder layers and `init_params`), `attention`, `moe`,
`mtp`, `layers` (norms, embedding, LM head, RoPE, SwiGLU), `layout` (scanned runs of identical
layers), `param_count` (parameter counts from shapes alone).
"""

from mimo_jax.model.param_count import count_parameters, summary
from mimo_jax.model.transformer import MiMoV2Flash, ModelOutput, init_params

__all__ = ["MiMoV2Flash", "ModelOutput", "count_parameters", "init_params", "summary"]
