"""Dense masked attention in plain jnp: the definition every other implementation is held to.

Also the building blocks the others reuse: `attention_mask` (which keys a query sees) and
`masked_attention` (softmax with sinks under an explicit mask), used by the chunked path, the
context-parallel global layers and the KV-cache attention.

Legend: B batch, T query length, S key length, N query heads, K KV heads, G = N // K,
H q/k head dim, U value head dim.

Sink semantics: a per-head logit `sink[n]` joins every row's softmax as an extra column that carries
no value, so the weights over real keys sum to less than one:
  p_ij = exp(a_ij - m) / (exp(sink - m) + sum_j exp(a_ij - m)),  m = max(max_j a_ij, sink).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def check_arguments(q, k, v, sinks, window, segment_ids) -> None:
    """Raises ValueError naming the bad value when the arguments break the attention contract."""
    b, t, n, h = q.shape
    if k.shape[:2] != (b, t) or v.shape[:3] != k.shape[:3] or k.shape[3] != h:
        raise ValueError(f"attention shapes disagree: q {q.shape}, k {k.shape}, v {v.shape}")
    if n % k.shape[2]:
        raise ValueError(f"query heads {n} are not a multiple of KV heads {k.shape[2]}")
    if sinks is not None and sinks.shape != (n,):
        raise ValueError(f"sinks must have shape ({n},), got {sinks.shape}")
    if window is not None and window < 1:
        raise ValueError(f"window must be >= 1 or None, got {window}")
    if segment_ids is not None and segment_ids.shape != (b, t):
        raise ValueError(f"segment_ids must have shape {(b, t)}, got {segment_ids.shape}")


def attention_mask(q_positions: jax.Array, k_positions: jax.Array, q_segments: jax.Array,
                   k_segments: jax.Array, window: int | None) -> jax.Array:
    """Which keys each query may see. Returns bool [B, Tq, S].

    Positions are absolute indices in the sequence (a key at position p is visible to a query at
    position i when i-W < p <= i); segments are ids with 0 for padding (also used for empty
    KV-cache slots: a key of segment 0 is never visible).
    """
    qp = q_positions[:, :, None]
    kp = k_positions[:, None, :]
    mask = kp <= qp
    if window is not None:
        mask &= kp > qp - window
    same = q_segments[:, :, None] == k_segments[:, None, :]
    return mask & same & (q_segments[:, :, None] != 0)


def masked_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array,
                     sinks: jax.Array | None) -> jax.Array:
    """Softmax attention (with sinks) under an explicit mask, in f32. The building block.

    Args:
      q: [B, T, N, H]. k: [B, S, K, H]. v: [B, S, K, U]. mask: [B, T, S] bool. sinks: [N] or None.
    Returns [B, T, N, U] float32. Rows with nothing visible return zeros.
    """
    b, t, n, h = q.shape
    num_kv = k.shape[2]
    qg = q.reshape(b, t, num_kv, n // num_kv, h).astype(jnp.float32)
    logits = jnp.einsum("btkgh,bskh->bkgts", qg, k.astype(jnp.float32)) * (h ** -0.5)
    logits = jnp.where(mask[:, None, None], logits, -jnp.inf)  # [B, K, G, T, S]
    row_max = jnp.max(logits, axis=-1)  # [B, K, G, T]
    if sinks is not None:
        sink = sinks.astype(jnp.float32).reshape(1, num_kv, n // num_kv, 1)
        row_max = jnp.maximum(row_max, sink)
    # A row with no visible key (and no sink) has max -inf; any finite shift keeps it at zero.
    row_max = jax.lax.stop_gradient(jnp.where(jnp.isfinite(row_max), row_max, 0.0))
    probs = jnp.exp(logits - row_max[..., None])
    denom = jnp.sum(probs, axis=-1)
    if sinks is not None:
        denom = denom + jnp.exp(sink - row_max)
    out = jnp.einsum("bkgts,bsku->btkgu", probs, v.astype(jnp.float32))
    denom = jnp.moveaxis(denom, -1, 1)[..., None]  # [B, T, K, G, 1]
    out = out / jnp.where(denom > 0, denom, 1.0)
    return out.reshape(b, t, n, v.shape[-1])


def default_segments(segment_ids: jax.Array | None, b: int, t: int) -> jax.Array:
    """int32 segment ids [B, T]; None means one document per row."""
    if segment_ids is None:
        return jnp.ones((b, t), jnp.int32)
    return segment_ids.astype(jnp.int32)


def reference_attention(q, k, v, *, sinks=None, window=None, segment_ids=None) -> jax.Array:
    """Dense masked attention, O(T^2) time and memory. Same contract as `api.attention`."""
    b, t = q.shape[:2]
    segments = default_segments(segment_ids, b, t)
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    mask = attention_mask(positions, positions, segments, segments, window)
    return masked_attention(q, k, v, mask, sinks).astype(q.dtype)
