"""Mixture-of-experts math as pure functions: routing, dropless dispatch, balance loss, bias update.

Legend: T tokens (batch and length flattened), D model dim, E experts, k experts per token,
F expert ffn dim, L MoE layers.

Two interchangeable dispatch backends compute the same thing:
  dense   every expert on every token, combined with a [T, E] weight matrix. E/k times the FLOPs,
          but plain einsums: the fastest choice on CPU at small E and the obviously-correct twin.
  ragged  sort token copies by expert, `jax.lax.ragged_dot` over contiguous groups, unsort and sum.
          Dropless: every copy is computed, whatever the load. The accelerator path.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

DISPATCH_IMPLS = ("dense", "ragged")


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
    weights = jnp.take_along_axis(scores, indices, axis=-1)
    if normalize:
        weights = weights / (jnp.sum(weights, axis=-1, keepdims=True) + 1e-20)
    return weights * scaling, indices.astype(jnp.int32), scores


def dense_dispatch(x: jax.Array, weights: jax.Array, indices: jax.Array, w_gate: jax.Array,
                   w_up: jax.Array, w_down: jax.Array) -> jax.Array:
    """Every expert on every token, combined by gate weight.

    x: [T, D]; weights, indices: [T, k]; w_gate, w_up: [E, D, F]; w_down: [E, F, D]. Returns [T, D].
    """
    num_experts = w_gate.shape[0]
    combine = jnp.sum(jax.nn.one_hot(indices, num_experts, dtype=jnp.float32) * weights[..., None],
                      axis=1)  # [T, E]
    gate = jnp.einsum("td,edf->tef", x, w_gate)
    up = jnp.einsum("td,edf->tef", x, w_up)
    # The down projection is linear, so the gate weights go in before it and one contraction over
    # (expert, ffn) replaces E per-expert products and a weighted sum of [T, E, D] outputs.
    hidden = (jax.nn.silu(gate) * up).astype(jnp.float32) * combine[..., None]  # [T, E, F]
    return jnp.einsum("tef,efd->td", hidden.astype(w_down.dtype), w_down,
                      preferred_element_type=jnp.float32).astype(x.dtype)


def sort_by_expert(indices: jax.Array, num_experts: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Orders the T*k token copies by expert.

    indices: [T, k]. Returns order [T*k] (copy ids sorted by expert; copy c is token c // k),
    group_sizes [E] int32 (copies per expert), and the sorted expert id of each copy [T*k].
    """
    flat = indices.reshape(-1)
    order = jnp.argsort(flat, stable=True)
    group_sizes = jnp.bincount(flat, length=num_experts).astype(jnp.int32)
    return order, group_sizes, flat[order]


def ragged_dispatch(x: jax.Array, weights: jax.Array, indices: jax.Array, w_gate: jax.Array,
                    w_up: jax.Array, w_down: jax.Array) -> jax.Array:
    """Dropless sorted dispatch with grouped matmuls. Same contract as `dense_dispatch`."""
    num_tokens, top_k = indices.shape
    order, group_sizes, _ = sort_by_expert(indices, w_gate.shape[0])
    token_of_copy = order // top_k
    xs = jnp.take(x, token_of_copy, axis=0)  # [T*k, D]
    gate = jax.lax.ragged_dot(xs, w_gate, group_sizes)
    up = jax.lax.ragged_dot(xs, w_up, group_sizes)
    out = jax.lax.ragged_dot(jax.nn.silu(gate) * up, w_down, group_sizes)  # [T*k, D]
    copy_weight = jnp.take(weights.reshape(-1), order)
    weighted = out.astype(jnp.float32) * copy_weight[:, None]
    combined = jax.ops.segment_sum(weighted, token_of_copy, num_segments=num_tokens)
    return combined.astype(x.dtype)


def dispatch(x, weights, indices, w_gate, w_up, w_down, *, impl: str = "dense") -> jax.Array:
    """Runs the routed experts. x: [T, D] -> [T, D]; see `dense_dispatch` for shapes."""
    if impl == "dense":
        return dense_dispatch(x, weights, indices, w_gate, w_up, w_down)
    if impl == "ragged":
        return ragged_dispatch(x, weights, indices, w_gate, w_up, w_down)
    raise ValueError(f"MoE impl {impl!r} is not one of {DISPATCH_IMPLS}")


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
