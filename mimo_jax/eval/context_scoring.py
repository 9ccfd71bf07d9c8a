"""One batched forward pass per row of a fixed length: next-token predictions and losses, scored
as retrieval exact match and as perplexity by position bucket.

Retrieval is scored teacher-forced: the answer is right when the argmax at every answer position
(given the context and the answer's earlier ids) is the answer's next id. That is exactly when
greedy decoding would produce the answer's ids, yet it costs one forward pass over the row instead
of a prefill and a decode step per answer id, and all rows of a length share one compiled program.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from mimo_jax.model.transformer import MiMoV2Flash

# (params, tokens [B, L] int32) -> (predictions [B, L] int32, nll [B, L-1] float32)
ForwardFn = Callable[[Any, jax.Array], tuple[jax.Array, jax.Array]]


def forward_fn(model: MiMoV2Flash) -> ForwardFn:
    """A jitted pass over rows of one document each: predictions[b, t] is the argmax next id after
    tokens[b, :t+1]; nll[b, t] is -log p(tokens[b, t+1] | tokens[b, :t+1]). It compiles once per
    row shape."""
    @jax.jit
    def run(params, tokens):
        logits = model.apply({"params": params}, tokens).logits.astype(jnp.float32)
        logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
        nll = -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
        return jnp.argmax(logits, axis=-1).astype(jnp.int32), nll
    return run


def run_rows(forward: ForwardFn, params: Any, rows: np.ndarray, batch_size: int
             ) -> tuple[np.ndarray, np.ndarray]:
    """`forward` over rows [N, L] in batches of `batch_size` (the last padded with copies of its
    first row, so every batch of every call at this length has one shape and `forward` compiles
    once) -> (predictions [N, L], nll [N, L-1])."""
    if rows.ndim != 2 or rows.shape[0] == 0:
        raise ValueError(f"rows must be a non-empty [N, L] array, got shape {rows.shape}")
    size = batch_size
    predictions, losses = [], []
    for start in range(0, rows.shape[0], size):
        batch = rows[start:start + size]
        count = batch.shape[0]
        if count < size:
            batch = np.concatenate([batch, np.repeat(batch[:1], size - count, axis=0)])
        pred, nll = jax.device_get(forward(params, jnp.asarray(batch, jnp.int32)))
        predictions.append(np.asarray(pred)[:count])
        losses.append(np.asarray(nll)[:count])
    return np.concatenate(predictions), np.concatenate(losses)


def answers_correct(predictions: np.ndarray, tokens: np.ndarray, answer_starts: np.ndarray
                    ) -> np.ndarray:
    """[N] bool: row n is right when predictions[n, t-1] == tokens[n, t] for every t from
    answer_starts[n] to the row's end (the answer closes the row).

    predictions, tokens: [N, L]; answer_starts: [N], each in [1, L-1].
    """
    length = tokens.shape[1]
    if np.any(answer_starts < 1) or np.any(answer_starts >= length):
        raise ValueError(f"answer starts {answer_starts.tolist()} must lie in [1, {length - 1}]")
    hits = predictions[:, :-1] == tokens[:, 1:]           # [N, L-1]: target index t-1
    in_answer = np.arange(1, length)[None, :] >= answer_starts[:, None]
    return np.all(hits | ~in_answer, axis=1)


def answer_loss(nll: np.ndarray, answer_starts: np.ndarray) -> np.ndarray:
    """[N] mean loss (nats per id) of each row's answer ids: a graded view of retrieval that moves
    before exact match does. nll: [N, L-1] per-target losses; answer_starts: [N]."""
    length = nll.shape[1] + 1
    in_answer = np.arange(1, length)[None, :] >= answer_starts[:, None]   # [N, L-1]
    return (nll * in_answer).sum(axis=1) / in_answer.sum(axis=1)


def bucket_edges(length: int, buckets: int) -> list[int]:
    """Log-spaced position buckets over a row of `length`: [0, L/2^(k-1), ..., L/4, L/2, L] for
    k = `buckets` (fewer where halving reaches 1), so that the last bucket is the row's second
    half and each earlier one half as long: positions beyond a trained length get their own
    buckets when the row is a power-of-two multiple of it."""
    if length < 2 or buckets < 1:
        raise ValueError(f"bucket_edges needs length >= 2 and buckets >= 1, got {length}, "
                         f"{buckets}")
    inner = sorted({length >> k for k in range(1, buckets)} - {0})
    return [0] + [e for e in inner if e < length] + [length]


def bucket_perplexity(nll: np.ndarray, edges: list[int]) -> list[float]:
    """exp(mean nll) of the targets whose position t (nll column t-1) is in [edges[i],
    edges[i+1]); position 0 has no target, so the first bucket starts at 1.

    nll: [N, L-1] per-target losses of rows of length L = edges[-1].
    """
    if nll.shape[1] != edges[-1] - 1:
        raise ValueError(f"nll has {nll.shape[1]} targets per row, the edges expect "
                         f"{edges[-1] - 1}")
    out = []
    for low, high in zip(edges[:-1], edges[1:]):
        columns = nll[:, max(low, 1) - 1:high - 1]
        out.append(float(np.exp(columns.astype(np.float64).mean())))
    return out
