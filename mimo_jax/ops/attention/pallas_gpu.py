"""Flash attention kernels for GPU (Pallas on Triton): forward, dq and dk/dv over the window only.

Legend: B batch, T length (padded to Tp), N query heads, K KV heads, G = N // K, H q/k head dim,
U value head dim; bq/bk query/key block lengths.

Layout: the caller's own [B, Tp, heads, D]; a Triton program addresses rows by strides, so nothing
is transposed. Each program owns one query block (forward, dq) or one key block (dk/dv) and loops
over exactly the blocks the window reaches (`BlockPlan.kv_range`/`q_range`): O(T * W) work.
GQA: a query head reads KV head `n // G` through its block index; the dk/dv program of a KV head
loops over its G query heads and accumulates, so K/V are never repeated and dk/dv are never summed
afterwards. Triton wants power-of-two tile shapes, so a head dim such as 192 is handled as 128 + 64
column chunks (each a separate tile matmul) instead of padding it to 256.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from mimo_jax.ops.attention import pallas_common as common
from mimo_jax.ops.attention.pallas_common import NN, NT, TN, BlockPlan

MIN_TILE = 16  # Triton's smallest matmul dimension
FORWARD_BLOCKS = (128, 64)
BACKWARD_BLOCKS = (64, 64)


def _next_pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def make_plans(seq_len: int, window: int | None, block_q: int | None,
               block_k: int | None, causal: bool = True) -> tuple[BlockPlan, BlockPlan]:
    """Forward and backward plans over one padded length (each side may tile differently)."""
    cap = max(MIN_TILE, _next_pow2(seq_len))
    plans = []
    for default_q, default_k in (FORWARD_BLOCKS, BACKWARD_BLOCKS):
        bq, bk = min(block_q or default_q, cap), min(block_k or default_k, cap)
        for name, size in (("block_q", bq), ("block_k", bk)):
            if size < MIN_TILE or size & (size - 1):
                raise ValueError(f"GPU {name}={size} must be a power of two >= {MIN_TILE}")
        plans.append((bq, bk))
    multiple = max(max(blocks) for blocks in plans)
    return tuple(BlockPlan.make(seq_len, bq, bk, window, multiple, causal) for bq, bk in plans)


def column_chunks(dim: int) -> tuple[tuple[int, int], ...]:
    """(offset, width) power-of-two chunks covering `dim` (a multiple of 16): 192 -> 128 + 64."""
    chunks, offset = [], 0
    for bit in reversed(range(dim.bit_length())):
        width = 1 << bit
        if dim - offset >= width:
            chunks.append((offset, width))
            offset += width
    return tuple(chunks)


def _pad(x: jax.Array, axis: int, size: int) -> jax.Array:
    if x.shape[axis] == size:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, widths)


def _prepare(x: jax.Array, plan: BlockPlan) -> jax.Array:
    """Pad time to the plan and the head dim to a multiple of Triton's smallest tile."""
    x = _pad(x, 1, plan.padded_len)
    return _pad(x, 3, -(-x.shape[3] // MIN_TILE) * MIN_TILE)


def _load(ref, rows, chunks):
    """Column chunks of the rows `rows` of a [rows, D] block."""
    return [ref[rows, pl.ds(offset, width)] for offset, width in chunks]


def _load_head(ref, rows, head, chunks):
    """Column chunks of one head of a [rows, heads, D] block."""
    return [ref[rows, head, pl.ds(offset, width)] for offset, width in chunks]


def _dot_chunks(a_chunks, b_chunks, dims):
    return functools.reduce(jnp.add, [common.dot(a, b, dims) for a, b in zip(a_chunks, b_chunks)])


def _params(num_warps: int, num_stages: int) -> pltriton.CompilerParams:
    return pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages)


# ----------------------------------------------------------------------------------------------
# Forward


def _segment_inputs(segments, kv_segments, padded_len: int) -> list[jax.Array]:
    """The queries' and the keys' segment ids [B, Tp] (the same array unless given apart)."""
    keys = segments if kv_segments is None else kv_segments
    return [_pad(x.astype(jnp.int32), 1, padded_len) for x in (segments, keys)]


def _forward_kernel(sinks_ref, q_ref, k_ref, v_ref, *refs, plan: BlockPlan, scale: float,
                    has_segments: bool, h_chunks, v_chunks):
    if has_segments:
        q_seg_ref, k_seg_ref, o_ref, lse_ref = refs
    else:
        o_ref, lse_ref = refs
    n, i = pl.program_id(1), pl.program_id(2)
    bq, bk = plan.block_q, plan.block_k
    q = _load(q_ref, slice(None), h_chunks)  # [bq, chunk] each
    q_pos = i * bq + jnp.arange(bq, dtype=jnp.int32)[:, None]
    q_seg = q_seg_ref[pl.ds(i * bq, bq)][:, None] if has_segments else None
    m, l = common.initial_state(sinks_ref[n], (bq, 1))
    accs = tuple(jnp.zeros((bq, width), jnp.float32) for _, width in v_chunks)

    def visit(j, carry):
        m, l, accs = carry
        rows = pl.ds(pl.multiple_of(j * bk, bk), bk)
        logits = _dot_chunks(q, _load(k_ref, rows, h_chunks), NT) * scale  # [bq, bk]
        k_pos = j * bk + jnp.arange(bk, dtype=jnp.int32)[None, :]
        k_seg = k_seg_ref[rows][None, :] if has_segments else None
        mask = common.tile_mask(q_pos, k_pos, plan, q_seg, k_seg)
        p, alpha, m, l = common.online_softmax_step(logits, mask, m, l)
        values = _load(v_ref, rows, v_chunks)
        accs = tuple(acc * alpha + common.dot(p.astype(val.dtype), val, NN)
                     for acc, val in zip(accs, values))
        return m, l, accs

    lo, hi = plan.kv_range(i)
    m, l, accs = jax.lax.fori_loop(lo, hi + 1, visit, (m, l, accs))
    inv_l, lse = common.finish_rows(m, l)
    for (offset, width), acc in zip(v_chunks, accs):
        o_ref[:, pl.ds(offset, width)] = (acc * inv_l).astype(o_ref.dtype)
    lse_ref[...] = lse[:, 0]


def forward(q, k, v, sinks, segments, plans, *, interpret: bool, kv_segments=None):
    """q [B, T, N, H], k [B, T, K, H], v [B, T, K, U], sinks [N] f32, segments [B, T] or None
    (the keys' own in `kv_segments` when they differ from the queries').

    Returns out [B, T, N, U] in q's dtype and the log-sum-exp [B, N, T] f32 (sink included).
    """
    plan = plans[0]
    b, t, n, h = q.shape
    num_kv, v_dim = k.shape[2], v.shape[3]
    group = n // num_kv
    qp, kp, vp = (_prepare(x, plan) for x in (q, k, v))
    hp, vdp = qp.shape[3], vp.shape[3]
    tp, bq = plan.padded_len, plan.block_q
    has_segments = segments is not None
    q_rows = lambda b_, n_, i: (b_, i, n_, 0)  # noqa: E731
    kv_all = lambda b_, n_, i: (b_, 0, jax.lax.div(n_, group), 0)  # noqa: E731
    in_specs = [pl.BlockSpec((n,), lambda b_, n_, i: (0,)),
                pl.BlockSpec((None, bq, None, hp), q_rows),
                pl.BlockSpec((None, tp, None, hp), kv_all),
                pl.BlockSpec((None, tp, None, vdp), kv_all)]
    inputs = [sinks, qp, kp, vp]
    if has_segments:
        in_specs += [pl.BlockSpec((None, tp), lambda b_, n_, i: (b_, 0))] * 2
        inputs += _segment_inputs(segments, kv_segments, tp)
    kernel = functools.partial(_forward_kernel, plan=plan, scale=h ** -0.5,
                               has_segments=has_segments, h_chunks=column_chunks(hp),
                               v_chunks=column_chunks(vdp))
    out, lse = pl.pallas_call(
        kernel,
        grid=(b, n, plan.num_q_blocks),
        in_specs=in_specs,
        out_specs=[pl.BlockSpec((None, bq, None, vdp), q_rows),
                   pl.BlockSpec((None, None, bq), lambda b_, n_, i: (b_, n_, i))],
        out_shape=[jax.ShapeDtypeStruct((b, tp, n, vdp), q.dtype),
                   jax.ShapeDtypeStruct((b, n, tp), jnp.float32)],
        compiler_params=_params(num_warps=8 if bq >= 128 else 4, num_stages=2),
        interpret=interpret,
        name="swa_flash_forward",
    )(*inputs)
    return out[:, :t, :, :v_dim], lse[:, :, :t]


# ----------------------------------------------------------------------------------------------
# Backward


def _dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs, plan: BlockPlan,
               scale: float, has_segments: bool, h_chunks, v_chunks):
    if has_segments:
        q_seg_ref, k_seg_ref, dq_ref = refs
    else:
        (dq_ref,) = refs
    i = pl.program_id(2)
    bq, bk = plan.block_q, plan.block_k
    q = _load(q_ref, slice(None), h_chunks)
    do = _load(do_ref, slice(None), v_chunks)
    lse = lse_ref[...][:, None]
    delta = delta_ref[...][:, None]
    q_pos = i * bq + jnp.arange(bq, dtype=jnp.int32)[:, None]
    q_seg = q_seg_ref[pl.ds(i * bq, bq)][:, None] if has_segments else None

    def visit(j, accs):
        rows = pl.ds(pl.multiple_of(j * bk, bk), bk)
        keys = _load(k_ref, rows, h_chunks)
        logits = _dot_chunks(q, keys, NT) * scale
        k_pos = j * bk + jnp.arange(bk, dtype=jnp.int32)[None, :]
        k_seg = k_seg_ref[rows][None, :] if has_segments else None
        p = common.probabilities(logits, common.tile_mask(q_pos, k_pos, plan, q_seg, k_seg), lse)
        dp = _dot_chunks(do, _load(v_ref, rows, v_chunks), NT)
        ds = p * (dp - delta)
        return tuple(acc + common.dot(ds.astype(key.dtype), key, NN)
                     for acc, key in zip(accs, keys))

    lo, hi = plan.kv_range(i)
    accs = tuple(jnp.zeros((bq, width), jnp.float32) for _, width in h_chunks)
    accs = jax.lax.fori_loop(lo, hi + 1, visit, accs)
    for (offset, width), acc in zip(h_chunks, accs):
        dq_ref[:, pl.ds(offset, width)] = (acc * scale).astype(dq_ref.dtype)


def _dkv_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs, plan: BlockPlan,
                scale: float, has_segments: bool, group: int, h_chunks, v_chunks):
    if has_segments:
        q_seg_ref, k_seg_ref, dk_ref, dv_ref = refs
    else:
        dk_ref, dv_ref = refs
    j = pl.program_id(2)
    bq, bk = plan.block_q, plan.block_k
    keys = _load(k_ref, slice(None), h_chunks)  # [bk, chunk] each
    values = _load(v_ref, slice(None), v_chunks)
    k_pos = j * bk + jnp.arange(bk, dtype=jnp.int32)[None, :]
    k_seg = k_seg_ref[pl.ds(j * bk, bk)][None, :] if has_segments else None
    lo, hi = plan.q_range(j)

    def visit(i, carry, g):
        dks, dvs = carry
        rows = pl.ds(pl.multiple_of(i * bq, bq), bq)
        q = _load_head(q_ref, rows, g, h_chunks)
        do = _load_head(do_ref, rows, g, v_chunks)
        lse = lse_ref[g, rows][:, None]
        delta = delta_ref[g, rows][:, None]
        logits = _dot_chunks(q, keys, NT) * scale  # [bq, bk]
        q_pos = i * bq + jnp.arange(bq, dtype=jnp.int32)[:, None]
        q_seg = q_seg_ref[rows][:, None] if has_segments else None
        p = common.probabilities(logits, common.tile_mask(q_pos, k_pos, plan, q_seg, k_seg), lse)
        dvs = tuple(acc + common.dot(p.astype(d.dtype), d, TN) for acc, d in zip(dvs, do))
        ds = p * (_dot_chunks(do, values, NT) - delta)
        dks = tuple(acc + common.dot(ds.astype(x.dtype), x, TN) for acc, x in zip(dks, q))
        return dks, dvs

    def head(g, carry):
        return jax.lax.fori_loop(lo, hi + 1, functools.partial(visit, g=g), carry)

    carry = (tuple(jnp.zeros((bk, w), jnp.float32) for _, w in h_chunks),
             tuple(jnp.zeros((bk, w), jnp.float32) for _, w in v_chunks))
    dks, dvs = jax.lax.fori_loop(0, group, head, carry)
    for (offset, width), acc in zip(h_chunks, dks):
        dk_ref[:, pl.ds(offset, width)] = (acc * scale).astype(dk_ref.dtype)
    for (offset, width), acc in zip(v_chunks, dvs):
        dv_ref[:, pl.ds(offset, width)] = acc.astype(dv_ref.dtype)


def backward(q, k, v, segments, lse, delta, dout, plans, *, interpret: bool, kv_segments=None):
    """Gradients of `forward`. lse, delta: [B, N, T] f32 (delta_i = sum_v dout_iv * out_iv).

    Returns dq [B, T, N, H], dk [B, T, K, H], dv [B, T, K, U] in the inputs' dtypes.
    """
    plan = plans[1]
    b, t, n, h = q.shape
    num_kv, v_dim = k.shape[2], v.shape[3]
    group = n // num_kv
    qp, kp, vp, dop = (_prepare(x, plan) for x in (q, k, v, dout))
    hp, vdp = qp.shape[3], vp.shape[3]
    tp, bq, bk = plan.padded_len, plan.block_q, plan.block_k
    lse, delta = (_pad(x, 2, tp) for x in (lse, delta))
    has_segments = segments is not None
    seg_inputs = _segment_inputs(segments, kv_segments, tp) if has_segments else []
    params = dict(plan=plan, scale=h ** -0.5, has_segments=has_segments,
                  h_chunks=column_chunks(hp), v_chunks=column_chunks(vdp))

    q_rows = lambda b_, n_, i: (b_, i, n_, 0)  # noqa: E731
    kv_all = lambda b_, n_, i: (b_, 0, jax.lax.div(n_, group), 0)  # noqa: E731
    stats = lambda b_, n_, i: (b_, n_, i)  # noqa: E731
    seg_specs = [pl.BlockSpec((None, tp), lambda b_, h_, x: (b_, 0))] * 2 if has_segments else []
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, **params),
        grid=(b, n, plan.num_q_blocks),
        in_specs=[pl.BlockSpec((None, bq, None, hp), q_rows),
                  pl.BlockSpec((None, tp, None, hp), kv_all),
                  pl.BlockSpec((None, tp, None, vdp), kv_all),
                  pl.BlockSpec((None, bq, None, vdp), q_rows),
                  pl.BlockSpec((None, None, bq), stats),
                  pl.BlockSpec((None, None, bq), stats), *seg_specs],
        out_specs=pl.BlockSpec((None, bq, None, hp), q_rows),
        out_shape=jax.ShapeDtypeStruct(qp.shape, q.dtype),
        compiler_params=_params(num_warps=4, num_stages=2),
        interpret=interpret,
        name="swa_flash_dq",
    )(qp, kp, vp, dop, lse, delta, *seg_inputs)

    k_rows = lambda b_, kh, j: (b_, j, kh, 0)  # noqa: E731
    group_all = lambda b_, kh, j: (b_, 0, kh, 0)  # noqa: E731
    group_stats = lambda b_, kh, j: (b_, kh, 0)  # noqa: E731
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, group=group, **params),
        grid=(b, num_kv, plan.num_k_blocks),
        in_specs=[pl.BlockSpec((None, tp, group, hp), group_all),
                  pl.BlockSpec((None, bk, None, hp), k_rows),
                  pl.BlockSpec((None, bk, None, vdp), k_rows),
                  pl.BlockSpec((None, tp, group, vdp), group_all),
                  pl.BlockSpec((None, group, tp), group_stats),
                  pl.BlockSpec((None, group, tp), group_stats), *seg_specs],
        out_specs=[pl.BlockSpec((None, bk, None, hp), k_rows),
                   pl.BlockSpec((None, bk, None, vdp), k_rows)],
        out_shape=[jax.ShapeDtypeStruct(kp.shape, k.dtype),
                   jax.ShapeDtypeStruct(vp.shape, v.dtype)],
        # dk and dv accumulate [bk, H + U] in f32 registers: 8 warps keep that under ~100 a thread.
        compiler_params=_params(num_warps=8, num_stages=2),
        interpret=interpret,
        name="swa_flash_dkv",
    )(qp, kp, vp, dop, lse, delta, *seg_inputs)
    return dq[:, :t, :, :h], dk[:, :t, :, :h], dv[:, :t, :, :v_dim]
