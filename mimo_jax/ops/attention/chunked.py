"""Attention by query chunks: with a sliding window each chunk reads only the keys its window
reaches, so cost and memory are O(T * (C + W)); full-causal layers read all keys per chunk
(O(T^2) compute, O(T * C) memory). The XLA path used on CPU.

Legend: B batch, T length, N query heads, K KV heads, H q/k head dim, U value head dim,
C chunk length, W window.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from mimo_jax.ops.attention.reference import attention_mask, default_segments, masked_attention


@functools.partial(jax.jit, static_argnames=("window", "chunk_size"))
def chunked_attention(q, k, v, *, sinks=None, window=None, segment_ids=None,
                      chunk_size: int = 128) -> jax.Array:
    """Attention by query chunks of C; with a window only the keys the window reaches are read.

    Same contract as `api.attention`. Query chunk c covers [cC, (c+1)C); with window W it reads keys
    [cC - P, (c+1)C) where P is W-1 rounded up to a multiple of C, so each chunk touches
    1 + P/C key chunks and the whole pass costs O(T * (C + P)).
    """
    b, t, n, _ = q.shape
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

        # Rematerialised in the backward pass: only one chunk's [C, T] probabilities are alive
        # at a time, not every chunk's (which would be O(T^2) memory).
        @jax.checkpoint
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
