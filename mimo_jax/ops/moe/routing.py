"""The MoE router and its balancing, as pure functions: sigmoid top-k routing with the aux-loss-free
correction bias, routing replay (R3), per-expert load, the sequence-wise balance loss and the bias
update.

Legend: T tokens (batch and length flattened), B batch, E experts, k experts per token,
L MoE layers.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def route(logits: jax.Array, correction_bias: jax.Array, top_k: int, *,
          normalize: bool = True, scaling: float = 1.0) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Sigmoid router with aux-loss-free correction bias.

    The bias only chooses experts; the gate weights are the chosen sigmoid scores, renormalised to
    sum to one (+1e-20) and multiplied by `scaling`.

    Args:
      logits: [T, E] float32 router logits `x @ W_g^T`.
      correction_bias: [E] float32 (no gradient flows into it).
    Returns:
      weights [T, k] float32, indices [T, k] int32, scores [T, E] float32 (the sigmoid scores).
    """
    scores = jax.nn.sigmoid(logits.astype(jnp.float32))
    choice = scores + jax.lax.stop_gradient(correction_bias.astype(jnp.float32))
    _, indices = jax.lax.top_k(choice, top_k)
    indices = indices.astype(jnp.int32)
    return gate_weights(scores, indices, normalize=normalize, scaling=scaling), indices, scores


def gate_weights(scores: jax.Array, indices: jax.Array, *, normalize: bool = True,
                 scaling: float = 1.0) -> jax.Array:
    """The gate weights of experts `indices`: their sigmoid scores, renormalised to sum to one
    (+1e-20) when `normalize`, times `scaling`. The gradient reaches exactly these scores.

    scores: [T, E] float32; indices: [T, k] int. Returns [T, k] float32.
    """
    weights = jnp.take_along_axis(scores, indices, axis=-1)
    if normalize:
        weights = weights / (jnp.sum(weights, axis=-1, keepdims=True) + 1e-20)
    return weights * scaling


def replayed_indices(replayed: jax.Array, chosen: jax.Array) -> jax.Array:
    """Rollout Routing Replay's expert choice: the replayed experts, except for tokens whose
    replayed row holds a -1 (nothing recorded there), which keep the router's own choice.

    replayed, chosen: [..., k] int. Returns [..., k] int32.
    """
    recorded = jnp.all(replayed >= 0, axis=-1, keepdims=True)
    return jnp.where(recorded, replayed, chosen).astype(jnp.int32)


def replay_mismatch(replayed: jax.Array, chosen: jax.Array,
                    token_mask: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """How often the router would choose differently from the replayed routing.

    A token-expert choice is mismatched when the replayed expert is not among the router's own
    top-k for that token (order within the k does not matter). Tokens whose replayed row holds a
    -1 (nothing recorded) and tokens off `token_mask` are not counted.

    Args:
      replayed, chosen: [..., k] int expert ids (e.g. [B, T, L, k] from the model's output).
      token_mask: bool, the leading dims of `replayed` or a prefix of them (e.g. [B, T]); None =
        every token.
    Returns (mismatched choices [], counted choices []) float32; their ratio is the mismatch rate.
    """
    member = jnp.any(replayed[..., :, None] == chosen[..., None, :], axis=-1)  # [..., k]
    counted = jnp.all(replayed >= 0, axis=-1)  # [...]
    if token_mask is not None:
        token_mask = token_mask.reshape(
            token_mask.shape + (1,) * (counted.ndim - token_mask.ndim)).astype(bool)
        counted = counted & token_mask
    mismatched = jnp.sum(jnp.where(counted[..., None], ~member, False), dtype=jnp.float32)
    return mismatched, jnp.sum(counted, dtype=jnp.float32) * replayed.shape[-1]


def expert_load(indices: jax.Array, token_mask: jax.Array, num_experts: int) -> jax.Array:
    """Number of real (non-padding) token copies routed to each expert.

    indices: [T, k]; token_mask: [T] bool. Returns [E] float32.
    """
    hits = jax.nn.one_hot(indices, num_experts, dtype=jnp.float32) * token_mask[:, None, None]
    return jnp.sum(hits, axis=(0, 1))


def sequence_balance_loss(scores: jax.Array, indices: jax.Array, segment_ids: jax.Array,
                          top_k: int) -> jax.Array:
    """Sequence-wise balance loss (DeepSeek-V3), averaged over the documents of the batch.

    For a document of T' tokens: f_i = E / (k T') * #{t : i in topk(t)},
    P_i = mean_t s_{t,i} / sum_j s_{t,j}, loss = sum_i f_i P_i (1.0 at perfect balance). The
    coefficient (1e-5 in pre-training) is applied by the trainer.

    Args:
      scores: [B, T, E] sigmoid scores. indices: [B, T, k]. segment_ids: [B, T], 0 = padding;
        each (row, id) pair is one document.
    Returns a scalar float32.
    """
    b, t, e = scores.shape
    doc = (jnp.arange(b, dtype=jnp.int32)[:, None] * (t + 1) + segment_ids).reshape(-1)
    valid = (segment_ids > 0).reshape(-1).astype(jnp.float32)
    num_docs = b * (t + 1)
    probs = scores.reshape(-1, e) / jnp.sum(scores.reshape(-1, e), axis=-1, keepdims=True)
    hits = jnp.sum(jax.nn.one_hot(indices.reshape(-1, top_k), e, dtype=jnp.float32), axis=1)
    doc_len = jax.ops.segment_sum(valid, doc, num_segments=num_docs)  # [docs]
    doc_hits = jax.ops.segment_sum(hits * valid[:, None], doc, num_segments=num_docs)
    doc_probs = jax.ops.segment_sum(probs * valid[:, None], doc, num_segments=num_docs)
    safe_len = jnp.maximum(doc_len, 1.0)[:, None]
    f = doc_hits * (e / top_k) / safe_len
    p = doc_probs / safe_len
    per_doc = jnp.sum(f * p, axis=-1)
    present = doc_len > 0
    return jnp.sum(jnp.where(present, per_doc, 0.0)) / jnp.maximum(jnp.sum(present), 1)


def update_correction_bias(bias: jax.Array, load: jax.Array, rate: float) -> jax.Array:
    """Aux-loss-free balancing: `bias += rate * sign(mean_load - load)`, per layer.

    bias, load: [..., E] (e.g. [L, E] for L MoE layers). Underloaded experts get a higher bias and
    are chosen more often; the bias never weights the output. Returns the new bias.
    """
    mean_load = jnp.mean(load, axis=-1, keepdims=True)
    return bias + rate * jnp.sign(mean_load - load).astype(bias.dtype)
