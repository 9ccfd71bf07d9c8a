"""Causal self-attention with sliding windows, attention sinks, GQA and packed segments.

One entry point, `attention`, and three interchangeable implementations:
  reference  dense masked attention in plain jnp, O(T^2): the definition the others are held to.
  chunked    queries in chunks of C; with a window each chunk reads only the keys its window reaches,
             so cost and memory are O(T * (C + W)). Full-causal layers read all keys per chunk
             (O(T^2) compute, O(T * C) memory).
  pallas     the flash kernel in `swa_pallas.py` (TPU/GPU; `interpret=True` on CPU).

Legend: B batch, T query length, S key length, N query heads, K KV heads, G = N // K,
H q/k head dim, V value head dim, C chunk length.

Sink semantics: a per-head logit `sink[n]` joins every row's softmax as an extra column that carries
no value, so the weights over real keys sum to less than one:
  p_ij = exp(a_ij - m) / (exp(sink - m) + sum_j exp(a_ij - m)),  m = max(max_j a_ij, sink).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

IMPLS = ("reference", "chunked", "pallas", "auto")


def attention(q: jax.Array, k: jax.Array, v: jax.Array, *, sinks: jax.Array | None = None,
              window: int | None = None, segment_ids: jax.Array | None = None,
              impl: str = "auto", chunk_size: int = 128,
              mesh_axes: tuple | None = None) -> jax.Array:
    """Causal self-attention. Returns [B, T, N, V] in q's dtype.

    Args:
      q: [B, T, N, H] queries. k: [B, T, K, H] keys. v: [B, T, K, V] values. N % K == 0.
      sinks: [N] per-head sink logits, or None for no sink (equal to a sink of -inf).
      window: a query at i sees keys i-W+1..i (W keys, itself included); None = full causal.
      segment_ids: [B, T] int32; 0 marks padding (such a row attends to nothing and returns zeros),
        other rows see only keys with the same id. None = one segment, no padding.
      impl: "reference", "chunked", "pallas" or "auto" (Pallas on TPU/GPU, chunked on CPU).
      chunk_size: query chunk length of the chunked path.
      mesh_axes: optional (q, k/v) mesh PartitionSpecs of [batch, length, heads, head_dim] (from
        the logical axis rules). When the length entry splits the sequence on the current mesh,
        attention runs context-parallel (`context_parallel.py`); the result is the same.
    The softmax scale H**-0.5 is applied inside.
    """
    _check_shapes(q, k, v, sinks, window, segment_ids)
    if mesh_axes is not None:
        from mimo_jax.ops import context_parallel  # pylint: disable=import-outside-toplevel
        if context_parallel.is_context_sharded(mesh_axes[0]):
            return context_parallel.attention(
                q, k, v, sinks=sinks, window=window, segment_ids=segment_ids, impl=impl,
                chunk_size=chunk_size, q_spec=mesh_axes[0], kv_spec=mesh_axes[1])
    if impl == "auto":
        impl = "pallas" if jax.default_backend() in ("tpu", "gpu") else "chunked"
    if impl == "reference":
        return reference_attention(q, k, v, sinks=sinks, window=window, segment_ids=segment_ids)
    if impl == "chunked":
        return chunked_attention(q, k, v, sinks=sinks, window=window, segment_ids=segment_ids,
                                 chunk_size=chunk_size)
    if impl == "pallas":
        from mimo_jax.ops import swa_pallas  # pylint: disable=import-outside-toplevel
        return swa_pallas.flash_attention(q, k, v, sinks=sinks, window=window,
                                          segment_ids=segment_ids)
    raise ValueError(f"attention impl {impl!r} is not one of {IMPLS}")


def _check_shapes(q, k, v, sinks, window, segment_ids) -> None:
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
      q: [B, T, N, H]. k: [B, S, K, H]. v: [B, S, K, V]. mask: [B, T, S] bool. sinks: [N] or None.
    Returns [B, T, N, V] float32. Rows with nothing visible return zeros.
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
    out = jnp.einsum("bkgts,bskv->btkgv", probs, v.astype(jnp.float32))
    denom = jnp.moveaxis(denom, -1, 1)[..., None]  # [B, T, K, G, 1]
    out = out / jnp.where(denom > 0, denom, 1.0)
    return out.reshape(b, t, n, v.shape[-1])


def default_segments(segment_ids: jax.Array | None, b: int, t: int) -> jax.Array:
    """int32 segment ids [B, T]; None means one document per row."""
    if segment_ids is None:
        return jnp.ones((b, t), jnp.int32)
    return segment_ids.astype(jnp.int32)


def reference_attention(q, k, v, *, sinks=None, window=None, segment_ids=None) -> jax.Array:
    """Dense masked attention, O(T^2) time and memory. Same contract as `attention`."""
    b, t = q.shape[:2]
    segments = default_segments(segment_ids, b, t)
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    mask = attention_mask(positions, positions, segments, segments, window)
    return masked_attention(q, k, v, mask, sinks).astype(q.dtype)


@functools.partial(jax.jit, static_argnames=("window", "chunk_size"))
def chunked_attention(q, k, v, *, sinks=None, window=None, segment_ids=None,
                      chunk_size: int = 128) -> jax.Array:
    """Attention by query chunks of C; with a window only the keys the window reaches are read.

    Same contract as `attention`. Query chunk c covers [cC, (c+1)C); with window W it reads keys
    [cC - P, (c+1)C) where P is W-1 rounded up to a multiple of C, so each chunk touches
    1 + P/C key chunks and the whole pass costs O(T * (C + P)).
    """
    b, t, n, h = q.shape
    c = min(chunk_size, t)
    num_chunks = -(-t // c)
    pad = num_chunks * c - t
    segments = default_segments(segment_ids, b, t)
    if pad:
        # Padded tail rows get segment 0: they see nothing and nothing sees them.
        q, k, v = (jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))) for x in (q, k, v))
        segments = jnp.pad(segments, ((0, 0), (0, pad)))
    padded_t = num_chunks * c
    positions = jnp.arange(padded_t, dtype=jnp.int32)

    def chunks(x):  # [B, T', ...] -> [num_chunks, B, C, ...]
        return jnp.moveaxis(x.reshape(b, num_chunks, c, *x.shape[2:]), 1, 0)

    q_chunks, q_segs = chunks(q), chunks(segments)
    q_pos = positions.reshape(num_chunks, c)

    if window is None:
        k_pos = jnp.broadcast_to(positions, (b, padded_t))

        def one_chunk(args):
            qc, qs, qp = args
            mask = attention_mask(jnp.broadcast_to(qp, (b, c)), k_pos, qs, segments, None)
            return masked_attention(qc, k, v, mask, sinks)

        out = jax.lax.map(one_chunk, (q_chunks, q_segs, q_pos))
    else:
        prev = -(-(window - 1) // c)  # previous key chunks a query chunk's window reaches
        span = (prev + 1) * c

        def key_spans(x, fill=0):  # [B, T', ...] -> [num_chunks, B, span, ...]
            x = jnp.pad(x, ((0, 0), (prev * c, 0)) + ((0, 0),) * (x.ndim - 2),
                        constant_values=fill)
            xc = x.reshape(b, num_chunks + prev, c, *x.shape[2:])
            stacked = jnp.concatenate([xc[:, i:i + num_chunks] for i in range(prev + 1)], axis=2)
            return jnp.moveaxis(stacked, 1, 0)

        k_spans, v_spans, k_segs = key_spans(k), key_spans(v), key_spans(segments)
        k_pos = (positions.reshape(num_chunks, c)[:, :1] - prev * c
                 + jnp.arange(span, dtype=jnp.int32)[None])  # [num_chunks, span]

        def one_chunk(qc, qs, qp, kc, vc, ks, kp):
            mask = attention_mask(jnp.broadcast_to(qp, (b, c)), jnp.broadcast_to(kp, (b, span)),
                                  qs, ks, window)
            return masked_attention(qc, kc, vc, mask, sinks)

        out = jax.vmap(one_chunk)(q_chunks, q_segs, q_pos, k_spans, v_spans, k_segs, k_pos)
    out = jnp.moveaxis(out, 0, 1).reshape(b, padded_t, n, v.shape[-1])
    return out[:, :t].astype(q.dtype)
