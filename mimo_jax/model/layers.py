"""Building blocks: RMSNorm, token embedding, LM head, partial NeoX RoPE, dense SwiGLU.

Every parameter names its logical axes (`embed`, `vocab`, `mlp`, ...); `mimo_jax.parallel` maps them
onto mesh axes. Legend: B batch, T length, D model dim, F ffn dim, V vocab, N heads, H head dim.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mimo_jax.ops import fp8 as fp8_ops

Dtype = Any


def dtype_of(name: str) -> jnp.dtype:
    """'float32' | 'bfloat16' | 'float16' -> the jnp dtype."""
    return jnp.dtype(name)


def normal_init(std: float):
    return nn.initializers.normal(stddev=std)


def param_with_axes(module: nn.Module, name: str, init, shape: tuple[int, ...],
                    axes: tuple[str | None, ...], dtype: Dtype) -> jax.Array:
    """A parameter annotated with logical axis names (one per dimension)."""
    return module.param(name, nn.with_logical_partitioning(init, axes), shape, dtype)


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * w, computed in float32; w starts at 1 (no +1 offset)."""

    eps: float
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """x: [..., D] -> [..., D] in `dtype`."""
        weight = param_with_axes(self, "scale", nn.initializers.ones, (x.shape[-1],), ("norm",),
                                 self.param_dtype)
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (normed * weight.astype(jnp.float32)).astype(self.dtype)


class Embed(nn.Module):
    """Token embedding table [V, D]."""

    vocab_size: int
    features: int
    init_std: float
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, tokens: jax.Array) -> jax.Array:
        """tokens: [B, T] int -> [B, T, D]."""
        table = param_with_axes(self, "embedding", normal_init(self.init_std),
                                (self.vocab_size, self.features), ("vocab", "embed"),
                                self.param_dtype)
        return jnp.take(table, tokens, axis=0).astype(self.dtype)


class LMHead(nn.Module):
    """Output projection [D, V]; separate from the embedding (not tied). Logits are float32."""

    vocab_size: int
    init_std: float
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """x: [B, T, D] -> logits [B, T, V] float32."""
        kernel = param_with_axes(self, "kernel", normal_init(self.init_std),
                                 (x.shape[-1], self.vocab_size), ("embed", "vocab"),
                                 self.param_dtype)
        logits = jnp.einsum("btd,dv->btv", x.astype(self.dtype), kernel.astype(self.dtype),
                            preferred_element_type=jnp.float32)
        return nn.with_logical_constraint(logits, ("batch", "length", "vocab"))


def rope_frequencies(rope_dim: int, theta: float) -> jax.Array:
    """Inverse frequencies theta^(-2i/r) for i < r/2. Returns [r/2] float32."""
    return 1.0 / (theta ** (jnp.arange(0, rope_dim, 2, dtype=jnp.float32) / rope_dim))


def apply_partial_rope(x: jax.Array, positions: jax.Array, rope_dim: int, theta: float) -> jax.Array:
    """NeoX (rotate-half) RoPE on the first `rope_dim` dims of each head; the rest pass through.

    x: [B, T, N, H]; positions: [B, T] int (per-document positions restart at 0). Returns x's shape
    and dtype; the rotation itself is computed in float32.
    """
    if rope_dim == 0:
        return x
    angles = positions.astype(jnp.float32)[..., None] * rope_frequencies(rope_dim, theta)
    cos = jnp.cos(angles)[:, :, None, :]  # [B, T, 1, r/2]
    sin = jnp.sin(angles)[:, :, None, :]
    rot = x[..., :rope_dim].astype(jnp.float32)
    first, second = rot[..., : rope_dim // 2], rot[..., rope_dim // 2:]
    rotated = jnp.concatenate([first * cos - second * sin, second * cos + first * sin], axis=-1)
    return jnp.concatenate([rotated.astype(x.dtype), x[..., rope_dim:]], axis=-1)


class DenseSwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)), no biases. Used on layer 0 and in the MTP heads.

    fp8: the three GEMMs take block-scaled e4m3 operands (`mimo_jax.ops.fp8.fp8_project`).
    """

    intermediate_size: int
    init_std: float
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    fp8: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """x: [B, T, D] -> [B, T, D]."""
        d = x.shape[-1]
        init = normal_init(self.init_std)
        wi_gate = param_with_axes(self, "gate", init, (d, self.intermediate_size),
                                  ("embed", "mlp"), self.param_dtype)
        wi_up = param_with_axes(self, "up", init, (d, self.intermediate_size), ("embed", "mlp"),
                                self.param_dtype)
        wo = param_with_axes(self, "down", init, (self.intermediate_size, d), ("mlp", "embed"),
                             self.param_dtype)
        x = x.astype(self.dtype)
        if self.fp8:
            # The master weights are quantised as stored: no rounding to the compute dtype first.
            gate, up = fp8_ops.fp8_project(x, wi_gate), fp8_ops.fp8_project(x, wi_up)
        else:
            gate = jnp.einsum("btd,df->btf", x, wi_gate.astype(self.dtype))
            up = jnp.einsum("btd,df->btf", x, wi_up.astype(self.dtype))
        hidden = nn.with_logical_constraint(nn.silu(gate) * up, ("batch", "length", "mlp"))
        if self.fp8:
            return fp8_ops.fp8_project(hidden, wo)
        return jnp.einsum("btf,fd->btd", hidden, wo.astype(self.dtype))
