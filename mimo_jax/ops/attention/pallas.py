"""Pallas flash attention with a sliding window, per-head sinks, GQA and packed segments.

The differentiable entry point `flash_attention` (same contract as `api.attention`) wraps
two kernel families behind one `jax.custom_vjp`:
  pallas_tpu.py  Mosaic kernels for TPU (grid axes over the window's blocks, (8, 128) tiles).
  pallas_gpu.py  Triton kernels for GPU (one program per block, loops over the window's blocks).
pallas_common.py holds what both share: the block plan, the tile mask and the softmax tile math.

Legend: B batch, T length, N query heads, K KV heads, H q/k head dim, U value head dim.

Forward: each query row's online softmax starts from its sink (running max m = sink, running sum
l = 1, the sink's own exp) and never adds a value for it; the kernel also writes the row's
log-sum-exp lse = m + log l. Backward, from lse and delta_i = sum_v dO_iv * O_iv:
  p_ij = exp(a_ij - lse_i),  dv_j = sum_i p_ij dO_i,  ds_ij = p_ij (dO_i . v_j - delta_i),
  dq_i = scale * sum_j ds_ij k_j,  dk_j = scale * sum_i ds_ij q_i,
  dsink_n = -sum_i exp(sink_n - lse_i) delta_i   (the sink's weight times the row's delta).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from mimo_jax.ops.attention import pallas_gpu, pallas_tpu
from mimo_jax.ops.attention.reference import check_arguments

BACKENDS = ("tpu", "gpu")


@dataclasses.dataclass(frozen=True)
class _Static:
    """Everything about a call that is not an array: the custom_vjp's non-differentiable part."""

    backend: str
    plans: tuple  # pallas_common.BlockPlan per kernel family (TPU: one; GPU: fwd, bwd)
    interpret: bool


def flash_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, sinks: jax.Array | None = None,
                    window: int | None = None, segment_ids: jax.Array | None = None,
                    backend: str | None = None, interpret: bool | None = None,
                    block_q: int | None = None, block_k: int | None = None) -> jax.Array:
    """Causal flash attention. Returns [B, T, N, U] in q's dtype.

    Args:
      q: [B, T, N, H]. k: [B, T, K, H]. v: [B, T, K, U]; N % K == 0. bf16 or f32 (f32 accumulation).
      sinks: [N] per-head sink logits, or None (the same as a sink of -inf).
      window: a query at i sees keys i-W+1..i (W keys, itself included); None = full causal.
      segment_ids: [B, T] int; 0 marks padding (such a row sees nothing and outputs zeros).
      backend: "tpu" (Mosaic) or "gpu" (Triton); default: the default device's, "tpu" on CPU.
      interpret: run the kernels in the Pallas interpreter; default: True exactly on CPU.
      block_q, block_k: tile lengths (default: 128x128 on TPU; 128x64 forward and 64x64
        backward on GPU).
    """
    return flash_attention_with_lse(q, k, v, sinks=sinks, window=window, segment_ids=segment_ids,
                                    backend=backend, interpret=interpret, block_q=block_q,
                                    block_k=block_k)[0]


def flash_attention_with_lse(q: jax.Array, k: jax.Array, v: jax.Array, *,
                             sinks: jax.Array | None = None, window: int | None = None,
                             segment_ids: jax.Array | None = None,
                             kv_segment_ids: jax.Array | None = None, causal: bool = True,
                             backend: str | None = None, interpret: bool | None = None,
                             block_q: int | None = None, block_k: int | None = None
                             ) -> tuple[jax.Array, jax.Array]:
    """`flash_attention` over one block of keys, with each row's log-sum-exp, both
    differentiable: what merges attention over several key blocks (context parallelism).

    kv_segment_ids: [B, T] the keys' segment ids when they are not the queries' (another
      block's keys); None: `segment_ids`.
    causal: False lets every query see every key of its segment (keys that all precede the
      queries); a non-causal call has no window.
    Returns (out [B, T, N, U] in q's dtype, lse [B, N, T] float32, the sink included; a row that
    sees nothing gets `pallas_common.EMPTY_ROW_LSE`).
    """
    check_arguments(q, k, v, sinks, window, segment_ids)
    if not causal and window is not None:
        raise ValueError(f"a non-causal call has no window, got window={window}")
    t, n = q.shape[1], q.shape[2]
    if kv_segment_ids is not None and segment_ids is None:
        raise ValueError("kv_segment_ids needs the queries' segment_ids too")
    platform = jax.default_backend()
    if backend is None:
        backend = "gpu" if platform == "gpu" else "tpu"
    if backend not in BACKENDS:
        raise ValueError(f"flash attention backend {backend!r} is not one of {BACKENDS}")
    if interpret is None:
        interpret = platform == "cpu"
    if backend == "tpu":
        plans = (pallas_tpu.make_plan(t, window, block_q, block_k, causal),)
    else:
        plans = pallas_gpu.make_plans(t, window, block_q, block_k, causal)
    if sinks is None:
        sinks = jnp.full((n,), -jnp.inf, jnp.float32)
    return _flash(q, k, v, sinks.astype(jnp.float32), segment_ids, kv_segment_ids,
                  _Static(backend, plans, bool(interpret)))


def _module(static: _Static):
    return pallas_tpu if static.backend == "tpu" else pallas_gpu


def _kernel_plans(static: _Static):
    return static.plans[0] if static.backend == "tpu" else static.plans


def _forward(q, k, v, sinks, segment_ids, kv_segment_ids, static: _Static):
    return _module(static).forward(q, k, v, sinks, segment_ids, _kernel_plans(static),
                                   interpret=static.interpret, kv_segments=kv_segment_ids)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _flash(q, k, v, sinks, segment_ids, kv_segment_ids, static: _Static):
    return _forward(q, k, v, sinks, segment_ids, kv_segment_ids, static)


def _flash_fwd(q, k, v, sinks, segment_ids, kv_segment_ids, static: _Static):
    out, lse = _forward(q, k, v, sinks, segment_ids, kv_segment_ids, static)
    return (out, lse), (q, k, v, sinks, segment_ids, kv_segment_ids, out, lse)


def _flash_bwd(static: _Static, residuals, cotangents):
    q, k, v, sinks, segment_ids, kv_segment_ids, out, lse = residuals
    dout, dlse = cotangents
    # delta_i = dO_i . O_i - dlse_i: the softmax backward's row term, [B, N, T]. The lse's own
    # gradient enters as d lse_i / d a_ij = p_ij, i.e. as a shift of delta.
    delta = jnp.einsum("btnu,btnu->bnt", dout.astype(jnp.float32), out.astype(jnp.float32))
    delta = delta - dlse
    dq, dk, dv = _module(static).backward(q, k, v, segment_ids, lse, delta, dout,
                                          _kernel_plans(static), interpret=static.interpret,
                                          kv_segments=kv_segment_ids)
    sink_weight = jnp.exp(sinks[None, :, None] - lse)  # the sink's softmax weight per row
    dsinks = -jnp.sum(sink_weight * delta, axis=(0, 2))
    return dq, dk, dv, dsinks, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)
