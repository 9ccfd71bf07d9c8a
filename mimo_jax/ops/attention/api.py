"""Causal self-attention with sliding windows, attention sinks, GQA and packed segments.

The entry point `attention` and the one registry of its implementations. Each implementation
computes the same thing on one device's data:
  reference  dense masked attention in plain jnp, O(T^2) (`reference.py`): the definition the
             others are held to.
  chunked    queries in chunks of C; with a window each chunk reads only the keys its window
             reaches, O(T * (C + W)) (`chunked.py`).
  pallas     the flash kernels (`pallas.py`: Mosaic on TPU, Triton on GPU, the Pallas interpreter
             on CPU).
"auto" is resolved here, and only here: Pallas on TPU/GPU, chunked on CPU. When the call's mesh
axes split the sequence, `context_parallel.py` runs the chosen implementation on each shard
(sliding-window layers with a halo from the previous shard, global layers over gathered keys);
the result is the same.

Legend: B batch, T length, N query heads, K KV heads, H q/k head dim, U value head dim,
C chunk length, W window.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax

from mimo_jax.ops.attention import context_parallel
from mimo_jax.ops.attention.chunked import chunked_attention
from mimo_jax.ops.attention.pallas import flash_attention, flash_attention_with_lse
from mimo_jax.ops.attention.reference import check_arguments, reference_attention


def _reference(q, k, v, *, sinks, window, segment_ids, chunk_size):
    del chunk_size  # one dense pass, no chunks
    return reference_attention(q, k, v, sinks=sinks, window=window, segment_ids=segment_ids)


def _chunked(q, k, v, *, sinks, window, segment_ids, chunk_size):
    return chunked_attention(q, k, v, sinks=sinks, window=window, segment_ids=segment_ids,
                             chunk_size=chunk_size)


def _pallas(q, k, v, *, sinks, window, segment_ids, chunk_size):
    del chunk_size  # the kernels choose their own blocks
    return flash_attention(q, k, v, sinks=sinks, window=window, segment_ids=segment_ids)


# name -> fn(q, k, v, *, sinks, window, segment_ids, chunk_size) with the contract of `attention`.
IMPLEMENTATIONS: dict[str, Callable[..., jax.Array]] = {
    "reference": _reference,
    "chunked": _chunked,
    "pallas": _pallas,
}
IMPLS = ("auto",) + tuple(IMPLEMENTATIONS)


def resolve_impl(impl: str) -> str:
    """The implementation `impl` names on the default backend: "auto" is Pallas on TPU and GPU,
    chunked elsewhere. Raises ValueError for a name not in `IMPLS`."""
    if impl == "auto":
        return "pallas" if jax.default_backend() in ("tpu", "gpu") else "chunked"
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"attention impl {impl!r} is not one of {IMPLS}")
    return impl


def attention(q: jax.Array, k: jax.Array, v: jax.Array, *, sinks: jax.Array | None = None,
              window: int | None = None, segment_ids: jax.Array | None = None,
              impl: str = "auto", chunk_size: int = 128,
              mesh_axes: tuple | None = None) -> jax.Array:
    """Causal self-attention. Returns [B, T, N, U] in q's dtype.

    Args:
      q: [B, T, N, H] queries. k: [B, T, K, H] keys. v: [B, T, K, U] values. N % K == 0.
      sinks: [N] per-head sink logits, or None for no sink (equal to a sink of -inf).
      window: a query at i sees keys i-W+1..i (W keys, itself included); None = full causal.
      segment_ids: [B, T] int32; 0 marks padding (such a row attends to nothing and returns zeros),
        other rows see only keys with the same id. None = one segment, no padding.
      impl: one of `IMPLS`: "reference", "chunked", "pallas" or "auto" (see `resolve_impl`).
      chunk_size: query chunk length of the chunked path (and of context-parallel global layers
        that do not run the Pallas kernel).
      mesh_axes: optional (q, k/v) mesh PartitionSpecs of [batch, length, heads, head_dim] (from
        the logical axis rules). When the length entry splits the sequence on the current mesh,
        attention runs context-parallel (`context_parallel.py`); the result is the same.
    The softmax scale H**-0.5 is applied inside.
    """
    check_arguments(q, k, v, sinks, window, segment_ids)
    name = resolve_impl(impl)
    local = functools.partial(IMPLEMENTATIONS[name], chunk_size=chunk_size)
    if mesh_axes is not None and context_parallel.is_context_sharded(mesh_axes[0]):
        return context_parallel.attention(
            q, k, v, sinks=sinks, window=window, segment_ids=segment_ids, local_attention=local,
            chunk_size=chunk_size, q_spec=mesh_axes[0], kv_spec=mesh_axes[1],
            block_attention=flash_attention_with_lse if name == "pallas" else None)
    return local(q, k, v, sinks=sinks, window=window, segment_ids=segment_ids)
