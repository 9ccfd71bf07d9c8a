"""Causal self-attention: one entry point over several implementations, and KV-cache attention.

    from mimo_jax.ops import attention as attention_ops
    out = attention_ops.attention(q, k, v, sinks=sinks, window=128, segment_ids=segment_ids)

Modules: `api` (the entry point and the registry of implementations, where "auto" is resolved),
`reference` (dense masked attention, the definition, and its mask and softmax building blocks),
`chunked` (query chunks, O(T * (C + W)) with a window), `pallas` (flash kernels: `pallas_tpu`,
`pallas_gpu`, `pallas_common`), `context_parallel` (the sequence split over mesh axes), `kv_cache`
(attention over a decoding cache).
"""

from mimo_jax.ops.attention.api import IMPLEMENTATIONS, IMPLS, attention, resolve_impl
from mimo_jax.ops.attention.chunked import chunked_attention
from mimo_jax.ops.attention.reference import (attention_mask, default_segments, masked_attention,
                                              reference_attention)

__all__ = ["IMPLEMENTATIONS", "IMPLS", "attention", "attention_mask", "chunked_attention",
           "default_segments", "masked_attention", "reference_attention", "resolve_impl"]
