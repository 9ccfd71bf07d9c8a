"""Sliding-window (SWA) and global (GA) attention layers of MiMo-V2-Flash.

Both types share the code; an `AttentionConfig` sets heads, KV heads, head dims, RoPE theta, window
and whether the layer has a learnable per-head sink. The attention itself is `mimo_jax.ops.attention`
(`attention` over a batch, `kv_cache.attend` over a decoding cache).
Legend: B batch, T length, D model dim, N query heads, K KV heads, H q/k head dim, U value head dim.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mimo_jax.config import AttentionConfig
from mimo_jax.model.layers import apply_partial_rope, normal_init
from mimo_jax.ops import attention as attention_ops
from mimo_jax.ops import fp8 as fp8_ops
from mimo_jax.ops.attention import kv_cache


class Attention(nn.Module):
    """Projections, partial RoPE, value scale, optional sink, output projection. No biases.

    fp8: the q/k/v projections take block-scaled e4m3 operands (`mimo_jax.ops.fp8.fp8_project`);
    the output projection stays in the compute dtype, as in the report.
    """

    config: AttentionConfig
    hidden_size: int
    value_scale: float
    init_std: float
    impl: str = "auto"
    chunk_size: int = 128
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    fp8: bool = False

    def setup(self):
        cfg = self.config
        init = normal_init(self.init_std)
        self.q_proj = self.param("q_proj", nn.with_logical_partitioning(
            init, ("embed", "heads", "head_dim")), (self.hidden_size, cfg.num_heads, cfg.qk_head_dim),
            self.param_dtype)
        self.k_proj = self.param("k_proj", nn.with_logical_partitioning(
            init, ("embed", "kv_heads", "head_dim")), (self.hidden_size, cfg.num_kv_heads, cfg.qk_head_dim),
            self.param_dtype)
        self.v_proj = self.param("v_proj", nn.with_logical_partitioning(
            init, ("embed", "kv_heads", "head_dim")), (self.hidden_size, cfg.num_kv_heads, cfg.v_head_dim),
            self.param_dtype)
        self.o_proj = self.param("o_proj", nn.with_logical_partitioning(
            init, ("heads", "head_dim", "embed")), (cfg.num_heads, cfg.v_head_dim, self.hidden_size),
            self.param_dtype)
        if cfg.attention_sink:
            self.sinks = self.param("sinks", nn.with_logical_partitioning(init, ("heads",)),
                                    (cfg.num_heads,), self.param_dtype)
        else:
            self.sinks = None

    def project(self, x: jax.Array, positions: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Queries, keys and values with RoPE applied and values scaled (what a KV cache stores).

        x: [B, T, D]; positions: [B, T]. Returns q [B, T, N, H], k [B, T, K, H], v [B, T, K, U].
        """
        cfg = self.config
        x = x.astype(self.dtype)
        if self.fp8:
            q, k, v = (fp8_ops.fp8_project(x, w) for w in (self.q_proj, self.k_proj, self.v_proj))
        else:
            q = jnp.einsum("btd,dnh->btnh", x, self.q_proj.astype(self.dtype))
            k = jnp.einsum("btd,dkh->btkh", x, self.k_proj.astype(self.dtype))
            v = jnp.einsum("btd,dkh->btkh", x, self.v_proj.astype(self.dtype))
        # The value scale is applied before attention and before the KV cache, as in the reference.
        v = v * jnp.asarray(self.value_scale, v.dtype)
        q = apply_partial_rope(q, positions, cfg.rope_dim, cfg.rope_theta)
        k = apply_partial_rope(k, positions, cfg.rope_dim, cfg.rope_theta)
        q = nn.with_logical_constraint(q, ("batch", "length", "heads", "head_dim"))
        k = nn.with_logical_constraint(k, ("batch", "length", "kv_heads", "head_dim"))
        v = nn.with_logical_constraint(v, ("batch", "length", "kv_heads", "head_dim"))
        return q, k, v

    def output(self, attended: jax.Array) -> jax.Array:
        """attended: [B, T, N, U] -> [B, T, D]."""
        return jnp.einsum("btnu,nud->btd", attended.astype(self.dtype),
                          self.o_proj.astype(self.dtype))

    def decode(self, x: jax.Array, positions: jax.Array,
               cache: kv_cache.LayerCache) -> tuple[jax.Array, kv_cache.LayerCache]:
        """Attention of a chunk of new tokens over a KV cache, which it then extends.

        x: [B, T, D]; positions: [B, T] absolute positions, -1 for padding (neither attends nor is
        stored); cache: the layer's `kv_cache.LayerCache`. Returns ([B, T, D], new cache).
        """
        q, k, v = self.project(x, jnp.maximum(positions, 0))
        attended, cache = kv_cache.attend(cache, q, k, v, positions,
                                          window=self.config.sliding_window, sinks=self.sinks)
        # Under a mesh the cache is split like the keys it holds (rows over the batch axes, KV
        # heads over whatever splits them); a no-op without logical rules.
        cache = kv_cache.LayerCache(
            keys=nn.with_logical_constraint(cache.keys, ("batch", "kv_heads", None, "head_dim")),
            values=nn.with_logical_constraint(cache.values,
                                              ("batch", "kv_heads", "head_dim", None)),
            positions=nn.with_logical_constraint(cache.positions, ("batch", None)))
        return self.output(attended.astype(self.dtype)), cache

    def __call__(self, x: jax.Array, positions: jax.Array,
                 segment_ids: jax.Array | None) -> jax.Array:
        """Causal self-attention over a (possibly packed) batch. x: [B, T, D] -> [B, T, D]."""
        q, k, v = self.project(x, positions)
        attended = attention_ops.attention(
            q, k, v, sinks=self.sinks, window=self.config.sliding_window,
            segment_ids=segment_ids, impl=self.impl, chunk_size=self.chunk_size,
            # Mesh axes of q and k/v under the current logical rules; a split length axis runs
            # context-parallel attention.
            mesh_axes=(nn.logical_to_mesh_axes(("batch", "length", "heads", "head_dim")),
                       nn.logical_to_mesh_axes(("batch", "length", "kv_heads", "head_dim"))))
        return self.output(attended)
