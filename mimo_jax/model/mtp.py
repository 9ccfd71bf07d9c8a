"""Multi-token prediction (MTP) heads, DeepSeek-V3 style, and the segment-aware shift they train on.

Head k (1-based) at position i sees the previous depth's hidden state h_i^{k-1} (h^0 is the main
model's last hidden state, before the final norm) and the embedding of token t_{i+k}, and predicts
t_{i+k+1}:
  h_i^k = Block(eh_proj([RMSNorm(Emb(t_{i+k})) ; RMSNorm(h_i^{k-1})]))
  logits_i^k = LMHead(RMSNorm(h_i^k))
Block is one pre-norm layer with sliding-window attention (the SWA layers' shapes, window and sink)
and a dense SwiGLU FFN. Embedding and LM head are the main model's.
Legend: B batch, T length, D model dim.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mimo_jax.config import ModelConfig
from mimo_jax.model.attention import Attention
from mimo_jax.model.layers import DenseSwiGLU, RMSNorm, dtype_of, normal_init, param_with_axes
from mimo_jax.ops.attention.kv_cache import LayerCache


def shift_left(x: jax.Array, segment_ids: jax.Array, shift: int,
               fill: Any = 0) -> tuple[jax.Array, jax.Array]:
    """x[:, t + shift] at position t, within each packed document.

    x: [B, T, ...]; segment_ids: [B, T] (0 = padding). Returns the shifted array and a valid mask
    [B, T] bool: False where t + shift runs past the row or into another document (or padding);
    those entries hold `fill`.
    """
    t = segment_ids.shape[1]
    if shift == 0:
        return x, segment_ids > 0
    pad_width = ((0, 0), (0, shift)) + ((0, 0),) * (x.ndim - 2)
    shifted = jnp.pad(x, pad_width, constant_values=fill)[:, shift:shift + t]
    shifted_seg = jnp.pad(segment_ids, ((0, 0), (0, shift)))[:, shift:shift + t]
    valid = (shifted_seg == segment_ids) & (segment_ids > 0)
    mask = valid.reshape(valid.shape + (1,) * (x.ndim - 2))
    return jnp.where(mask, shifted, jnp.asarray(fill, x.dtype)), valid


class MTPHead(nn.Module):
    """One MTP depth. Returns its hidden state h^k (before the final norm), the normed output and
    its updated KV cache (None when not decoding)."""

    config: ModelConfig

    @nn.compact
    def __call__(self, previous_hidden: jax.Array, next_token_embedding: jax.Array,
                 positions: jax.Array, segment_ids: jax.Array,
                 cache: LayerCache | None = None
                 ) -> tuple[jax.Array, jax.Array, LayerCache | None]:
        """previous_hidden, next_token_embedding: [B, T, D] ->
        (h^k [B, T, D], normed [B, T, D], new cache or None).

        With a KV `cache` (decoding; positions -1 mark padding) attention runs over it and the
        extended cache is the third value; without one the third value is None.
        """
        cfg = self.config
        dtype, param_dtype = dtype_of(cfg.runtime.dtype), dtype_of(cfg.param_dtype)

        def norm(name):
            return RMSNorm(cfg.norm_eps, dtype=dtype, param_dtype=param_dtype, name=name)

        joined = jnp.concatenate([norm("token_norm")(next_token_embedding),
                                  norm("hidden_norm")(previous_hidden)], axis=-1)
        eh_proj = param_with_axes(self, "eh_proj", normal_init(cfg.init_std),
                                  (2 * cfg.hidden_size, cfg.hidden_size), ("mlp", "embed"),
                                  param_dtype)
        h = jnp.einsum("bte,ed->btd", joined, eh_proj.astype(dtype))
        attention = Attention(cfg.sliding, cfg.hidden_size, cfg.value_scale, cfg.init_std,
                              impl=cfg.runtime.attention_impl,
                              chunk_size=cfg.runtime.attention_chunk_size,
                              dtype=dtype, param_dtype=param_dtype, fp8=cfg.fp8,
                              name="attention")
        if cache is None:
            h = h + attention(norm("input_norm")(h), positions, segment_ids)
        else:
            attended, cache = attention.decode(norm("input_norm")(h), positions, cache)
            h = h + attended
        mlp = DenseSwiGLU(cfg.dense_intermediate_size, cfg.init_std, dtype=dtype,
                          param_dtype=param_dtype, fp8=cfg.fp8, name="mlp")
        h = h + mlp(norm("post_attention_norm")(h))
        return h, norm("final_norm")(h), cache
