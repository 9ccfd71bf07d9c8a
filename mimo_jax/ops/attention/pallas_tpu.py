"""Flash attention kernels for TPU (Mosaic): forward, dq and dk/dv, block-sparse over the window.

Legend: B batch, T length (padded to Tp), N query heads, K KV heads, G = N // K, H q/k head dim,
U value head dim (both padded to Hp/Up, multiples of 128 lanes); bq/bk query/key block lengths.

Layout: heads before time, [B, N, Tp, Hp], so every block is a (rows, 128k) tile. The sliding
window is a grid axis of `kv_steps` (or `q_steps`) entries whose index maps point at the key (query)
blocks the window reaches; steps past the end of a short range repeat the last block index, which
Pallas does not fetch again, and `pl.when` skips their compute.

GQA without repeating K/V: the forward and dq grids run over KV heads, and each step takes the G
query heads of its KV head as one block of G along the head axis, stacked into a [G * bq, Hp] tile
against one [bk, Hp] key tile (each K/V tile is fetched once per group, and the matmuls are G times
taller than a single head's, which amortises the per-step cost). The dk/dv grid keeps one K/V block
resident and takes the group's G heads side by side, [bk, G * bq], per query block it walks.

Per-query values used down a tile's rows travel lane-broadcast ([.., Tp, 128]); those used along a
tile's columns travel as rows ([.., 1, Tp], or sublane-broadcast [.., 8, Tp]): the layouts Mosaic
broadcasts cheaply.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from mimo_jax.ops.attention import pallas_common as common
from mimo_jax.ops.attention.pallas_common import NN, NT, BlockPlan

LANES = 128
SUBLANES = 8
DEFAULT_BLOCK_Q = 128
DEFAULT_BLOCK_K = 128


def make_plan(seq_len: int, window: int | None, block_q: int | None,
              block_k: int | None, causal: bool = True) -> BlockPlan:
    """Blocks of 128 rows by default. Blocks are always whole multiples of 128, so a block's rows
    (or, transposed, its columns) are whole lane tiles: a short sequence is padded to 128."""
    block_q = block_q or DEFAULT_BLOCK_Q
    block_k = block_k or DEFAULT_BLOCK_K
    for name, size in (("block_q", block_q), ("block_k", block_k)):
        if size % LANES:
            raise ValueError(f"TPU {name}={size} must be a multiple of {LANES}")
    return BlockPlan.make(seq_len, block_q, block_k, window, causal=causal)


def _pad_to(x: jax.Array, axis: int, size: int) -> jax.Array:
    if x.shape[axis] == size:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, widths)


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def _to_kernel_layout(x: jax.Array, plan: BlockPlan) -> jax.Array:
    """[B, T, heads, D] -> [B, heads, Tp, Dp]: one transpose that XLA fuses with the padding."""
    x = jnp.swapaxes(x, 1, 2)
    return _pad_to(_pad_to(x, 2, plan.padded_len), 3, _round_up(x.shape[3], LANES))


def _from_kernel_layout(x: jax.Array, seq_len: int, dim: int) -> jax.Array:
    return jnp.swapaxes(x[:, :, :seq_len, :dim], 1, 2)


def _segment_layouts(segments: jax.Array | None, plan: BlockPlan):
    """Segment ids as columns [B, Tp, 128] and as rows [B, 8, Tp] (0 = padding, also the tail)."""
    if segments is None:
        return None, None
    segments = _pad_to(segments.astype(jnp.int32), 1, plan.padded_len)
    b, t = segments.shape
    columns = jax.lax.broadcast_in_dim(segments, (b, t, LANES), (0, 1))
    rows = jax.lax.broadcast_in_dim(segments, (b, SUBLANES, t), (0, 2))
    return columns, rows


def _query_and_key_layouts(segments, kv_segments, plan: BlockPlan):
    """`_segment_layouts` of the queries' segment ids and of the keys' (the same unless
    `kv_segments` is given)."""
    queries = _segment_layouts(segments, plan)
    return queries, (queries if kv_segments is None else _segment_layouts(kv_segments, plan))


def _positions(shape, row_start, col_start):
    rows = row_start + jax.lax.broadcasted_iota(jnp.int32, shape, 0)
    cols = col_start + jax.lax.broadcasted_iota(jnp.int32, shape, 1)
    return rows, cols


def _stack(x: jax.Array, group: int) -> jax.Array:
    """[G, rows, D] -> [G * rows, D]: the group's heads as one tall tile (rows % 8 == 0)."""
    return x.reshape(group * x.shape[1], x.shape[2])


def _stacked_mask(plan: BlockPlan, group: int, i, j, q_seg_ref, k_seg_ref) -> jax.Array:
    """The mask of a [G * bq, bk] tile whose rows are G copies of query block i's positions."""
    bq, bk = plan.block_q, plan.block_k
    shape = (group, bq, bk)
    q_pos = _stack(i * bq + jax.lax.broadcasted_iota(jnp.int32, shape, 1), group)
    k_pos = j * bk + jax.lax.broadcasted_iota(jnp.int32, (group * bq, bk), 1)
    q_seg = k_seg = None
    if q_seg_ref is not None:
        # int32 copies are stacked, never masks: Mosaic reshapes 32-bit tiles freely.
        q_seg = _stack(jnp.broadcast_to(q_seg_ref[...][None], (group, bq, LANES)), group)[:, :1]
        k_seg = k_seg_ref[:1, :]
    return common.tile_mask(q_pos, k_pos, plan, q_seg, k_seg)


class _QueryMajorMaps:
    """Index maps of the grid (B, K, query block i, key step): forward and dq. One step holds the
    G query heads of KV head `kv_head` (a block of G along the head axis), so each K/V tile is
    fetched once for the whole group. Trailing arguments (scalar-prefetched sinks) are ignored."""

    def __init__(self, plan: BlockPlan):
        self.plan = plan

    def q_rows(self, b, kv_head, i, step, *_):
        return b, kv_head, i, 0

    def kv_rows(self, b, kv_head, i, step, *_):
        return b, kv_head, self.plan.kv_block(i, step), 0

    def q_stats(self, b, kv_head, i, step, *_):
        return b, kv_head, 0, i

    def q_segments(self, b, kv_head, i, step, *_):
        return b, i, 0

    def kv_segments(self, b, kv_head, i, step, *_):
        return b, 0, self.plan.kv_block(i, step)


class _KeyMajorMaps:
    """Index maps of the grid (B, K, key block j, query step): dk/dv. A step takes the G query
    heads of KV head `kv_head` for the query block the step points at."""

    def __init__(self, plan: BlockPlan):
        self.plan = plan

    def q_rows(self, b, kv_head, j, step):
        return b, kv_head, self.plan.q_block(j, step), 0

    def kv_rows(self, b, kv_head, j, step):
        return b, kv_head, j, 0

    def q_stats(self, b, kv_head, j, step):
        return b, kv_head, 0, self.plan.q_block(j, step)

    def q_segments(self, b, kv_head, j, step):
        return b, 0, self.plan.q_block(j, step)

    def kv_segments(self, b, kv_head, j, step):
        return b, j, 0


# ----------------------------------------------------------------------------------------------
# Forward


def _forward_kernel(sinks_ref, q_ref, k_ref, v_ref, *refs, plan: BlockPlan, scale: float,
                    has_segments: bool, group: int):
    if has_segments:
        q_seg_ref, k_seg_ref, o_ref, lse_ref, m_ref, l_ref, acc_ref = refs
    else:
        (o_ref, lse_ref, m_ref, l_ref, acc_ref), q_seg_ref, k_seg_ref = refs, None, None
    kv_head, i, step = pl.program_id(1), pl.program_id(2), pl.program_id(3)
    bq = plan.block_q
    lo, hi = plan.kv_range(i)
    j = lo + step

    @pl.when(step == 0)
    def _init():
        for g in range(group):  # each head's rows start from its own sink
            m, l = common.initial_state(sinks_ref[kv_head * group + g], (bq, LANES))
            m_ref[g * bq:(g + 1) * bq, :] = m
            l_ref[g * bq:(g + 1) * bq, :] = l
        acc_ref[...] = jnp.zeros_like(acc_ref)

    @pl.when(j <= hi)
    def _visit():
        q = _stack(q_ref[...], group)  # [G * bq, Hp]
        logits = common.dot(q, k_ref[...], NT) * scale  # [G * bq, bk]
        mask = _stacked_mask(plan, group, i, j, q_seg_ref, k_seg_ref)
        p, alpha, m_next, l_next = common.online_softmax_step(logits, mask, m_ref[...], l_ref[...])
        v = v_ref[...]
        acc_ref[...] = acc_ref[...] * alpha[:, :1] + common.dot(p.astype(v.dtype), v, NN)
        m_ref[...] = m_next
        l_ref[...] = l_next

    @pl.when(step == plan.kv_steps - 1)
    def _finish():
        inv_l, lse = common.finish_rows(m_ref[...], l_ref[...])  # [G * bq, 128] each
        out = (acc_ref[...] * inv_l[:, :1]).astype(o_ref.dtype)
        o_ref[...] = out.reshape(o_ref.shape)
        for g in range(group):  # rows of the log-sum-exp: the layout the backward reads
            lse_ref[g] = jnp.transpose(lse[g * bq:(g + 1) * bq])[:1, :]


def forward(q, k, v, sinks, segments, plan: BlockPlan, *, interpret: bool, kv_segments=None):
    """q [B, T, N, H], k [B, T, K, H], v [B, T, K, U], sinks [N] f32, segments [B, T] or None
    (the keys' own in `kv_segments` when they differ from the queries').

    Returns out [B, T, N, U] in q's dtype and the log-sum-exp [B, N, T] f32 (sink included).
    """
    b, t, n, h = q.shape
    num_kv, v_dim = k.shape[2], v.shape[3]
    group = n // num_kv
    qt, kt, vt = (_to_kernel_layout(x, plan) for x in (q, k, v))
    hp, vp = qt.shape[3], vt.shape[3]
    bq, bk = plan.block_q, plan.block_k
    (q_columns, _), (_, k_rows) = _query_and_key_layouts(segments, kv_segments, plan)
    has_segments = segments is not None

    maps = _QueryMajorMaps(plan)
    in_specs = [pl.BlockSpec((None, group, bq, hp), maps.q_rows),
                pl.BlockSpec((None, None, bk, hp), maps.kv_rows),
                pl.BlockSpec((None, None, bk, vp), maps.kv_rows)]
    inputs = [qt, kt, vt]
    if has_segments:
        in_specs += [pl.BlockSpec((None, bq, LANES), maps.q_segments),
                     pl.BlockSpec((None, SUBLANES, bk), maps.kv_segments)]
        inputs += [q_columns, k_rows]
    out_specs = [pl.BlockSpec((None, group, bq, vp), maps.q_rows),
                 pl.BlockSpec((None, group, 1, bq), maps.q_stats)]
    kernel = functools.partial(_forward_kernel, plan=plan, scale=h ** -0.5,
                               has_segments=has_segments, group=group)
    out, lse = pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1,
            grid=(b, num_kv, plan.num_q_blocks, plan.kv_steps),
            in_specs=in_specs,
            out_specs=out_specs,
            scratch_shapes=[pltpu.VMEM((group * bq, LANES), jnp.float32),
                            pltpu.VMEM((group * bq, LANES), jnp.float32),
                            pltpu.VMEM((group * bq, vp), jnp.float32)],
        ),
        out_shape=[jax.ShapeDtypeStruct((b, n, plan.padded_len, vp), q.dtype),
                   jax.ShapeDtypeStruct((b, n, 1, plan.padded_len), jnp.float32)],
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
        cost_estimate=_cost(plan, b, n, 2 * (h + v_dim), qt, kt, vt),
        interpret=interpret,
        name="swa_flash_forward",
    )(sinks, *inputs)
    return _from_kernel_layout(out, t, v_dim), lse[:, :, 0, :t]


# ----------------------------------------------------------------------------------------------
# Backward: dq (grid over query blocks) and dk/dv (grid over key blocks), G heads per step


def _dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs, plan: BlockPlan,
               scale: float, has_segments: bool, group: int):
    if has_segments:
        q_seg_ref, k_seg_ref, dq_ref, acc_ref = refs
    else:
        (dq_ref, acc_ref), q_seg_ref, k_seg_ref = refs, None, None
    i, step = pl.program_id(2), pl.program_id(3)
    lo, hi = plan.kv_range(i)
    j = lo + step

    @pl.when(step == 0)
    def _init():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    @pl.when(j <= hi)
    def _visit():
        k = k_ref[...]
        logits = common.dot(_stack(q_ref[...], group), k, NT) * scale  # [G * bq, bk]
        mask = _stacked_mask(plan, group, i, j, q_seg_ref, k_seg_ref)
        # Per-row statistics arrive as rows [G, 1, bq]; the tile wants a column [G * bq, 1].
        lse = jnp.concatenate([jnp.expand_dims(lse_ref[g, 0], -1) for g in range(group)])
        delta = jnp.concatenate([jnp.expand_dims(delta_ref[g, 0], -1) for g in range(group)])
        p = common.probabilities(logits, mask, lse)
        dp = common.dot(_stack(do_ref[...], group), v_ref[...], NT)  # [G * bq, bk]
        ds = p * (dp - delta)
        acc_ref[...] += common.dot(ds.astype(k.dtype), k, NN)

    @pl.when(step == plan.kv_steps - 1)
    def _finish():
        dq_ref[...] = (acc_ref[...] * scale).astype(dq_ref.dtype).reshape(dq_ref.shape)


def _dkv_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs, plan: BlockPlan,
                scale: float, has_segments: bool, group: int):
    if has_segments:
        k_seg_ref, q_seg_ref, dk_ref, dv_ref, dk_acc_ref, dv_acc_ref = refs
    else:
        dk_ref, dv_ref, dk_acc_ref, dv_acc_ref = refs
    j, step = pl.program_id(2), pl.program_id(3)
    bq, bk = plan.block_q, plan.block_k
    lo, hi = plan.q_range(j)
    i = lo + step

    @pl.when(step == 0)
    def _init():
        dk_acc_ref[...] = jnp.zeros_like(dk_acc_ref)
        dv_acc_ref[...] = jnp.zeros_like(dv_acc_ref)

    @pl.when(i <= hi)
    def _visit():
        # Transposed tiles [bk, G * bq] (the group's heads side by side, 128-lane aligned): the
        # per-query statistics then arrive as rows and broadcast down the tile.
        q = _stack(q_ref[...], group)  # [G * bq, Hp]
        do = _stack(do_ref[...], group)
        logits_t = common.dot(k_ref[...], q, NT) * scale  # [bk, G * bq]
        k_pos, q_pos = _positions((bk, bq), j * bk, i * bq)
        q_pos = jnp.concatenate([q_pos] * group, axis=1)
        k_pos = jnp.concatenate([k_pos] * group, axis=1)
        q_seg = k_seg = None
        if has_segments:
            q_seg = jnp.concatenate([q_seg_ref[:1, :]] * group, axis=1)  # [1, G * bq]
            k_seg = k_seg_ref[:, :1]
        mask_t = common.tile_mask(q_pos, k_pos, plan, q_seg, k_seg)
        lse = jnp.concatenate([lse_ref[g] for g in range(group)], axis=1)  # [1, G * bq]
        delta = jnp.concatenate([delta_ref[g] for g in range(group)], axis=1)
        p_t = common.probabilities(logits_t, mask_t, lse)
        dv_acc_ref[...] += common.dot(p_t.astype(do.dtype), do, NN)
        dp_t = common.dot(v_ref[...], do, NT)  # [bk, G * bq]
        ds_t = p_t * (dp_t - delta)
        dk_acc_ref[...] += common.dot(ds_t.astype(q.dtype), q, NN)

    @pl.when(step == plan.q_steps - 1)
    def _finish():
        dk_ref[...] = (dk_acc_ref[...] * scale).astype(dk_ref.dtype)
        dv_ref[...] = dv_acc_ref[...].astype(dv_ref.dtype)


def _backward_specs(maps, group: int, bq: int, bk: int, hp: int, vp: int) -> list:
    """Blocks of q, k, v, dout, lse and delta for either backward grid (the maps say which)."""
    return [pl.BlockSpec((None, group, bq, hp), maps.q_rows),
            pl.BlockSpec((None, None, bk, hp), maps.kv_rows),
            pl.BlockSpec((None, None, bk, vp), maps.kv_rows),
            pl.BlockSpec((None, group, bq, vp), maps.q_rows),
            pl.BlockSpec((None, group, 1, bq), maps.q_stats),
            pl.BlockSpec((None, group, 1, bq), maps.q_stats)]


def backward(q, k, v, segments, lse, delta, dout, plan: BlockPlan, *, interpret: bool,
             kv_segments=None):
    """Gradients of `forward`. lse, delta: [B, N, T] f32 (delta_i = sum_v dout_iv * out_iv).

    Returns dq [B, T, N, H], dk [B, T, K, H], dv [B, T, K, U] in the inputs' dtypes.
    """
    b, t, n, h = q.shape
    num_kv, v_dim = k.shape[2], v.shape[3]
    group = n // num_kv
    qt, kt, vt, dout_t = (_to_kernel_layout(x, plan) for x in (q, k, v, dout))
    hp, vp = qt.shape[3], vt.shape[3]
    bq, bk = plan.block_q, plan.block_k
    stat_rows = [_pad_to(x, 2, plan.padded_len)[:, :, None, :] for x in (lse, delta)]
    (q_columns, q_rows), (k_columns, k_rows) = _query_and_key_layouts(segments, kv_segments,
                                                                      plan)
    has_segments = segments is not None
    scale = h ** -0.5
    params = dict(plan=plan, scale=scale, has_segments=has_segments, group=group)

    # dq: grid (B, K, query blocks, key steps), the group's G heads stacked in each step.
    maps = _QueryMajorMaps(plan)
    in_specs = _backward_specs(maps, group, bq, bk, hp, vp)
    inputs = [qt, kt, vt, dout_t, *stat_rows]
    if has_segments:
        in_specs += [pl.BlockSpec((None, bq, LANES), maps.q_segments),
                     pl.BlockSpec((None, SUBLANES, bk), maps.kv_segments)]
        inputs += [q_columns, k_rows]
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, **params),
        grid=(b, num_kv, plan.num_q_blocks, plan.kv_steps),
        in_specs=in_specs,
        out_specs=pl.BlockSpec((None, group, bq, hp), maps.q_rows),
        out_shape=jax.ShapeDtypeStruct(qt.shape, q.dtype),
        scratch_shapes=[pltpu.VMEM((group * bq, hp), jnp.float32)],
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
        cost_estimate=_cost(plan, b, n, 4 * h + 2 * v_dim, qt, kt, vt, dout_t),
        interpret=interpret,
        name="swa_flash_dq",
    )(*inputs)

    # dk, dv: grid (B, K, key blocks, query steps); the group's G heads side by side per step.
    maps = _KeyMajorMaps(plan)
    in_specs = _backward_specs(maps, group, bq, bk, hp, vp)
    inputs = [qt, kt, vt, dout_t, *stat_rows]
    if has_segments:
        in_specs += [pl.BlockSpec((None, bk, LANES), maps.kv_segments),
                     pl.BlockSpec((None, SUBLANES, bq), maps.q_segments)]
        inputs += [k_columns, q_rows]
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, **params),
        grid=(b, num_kv, plan.num_k_blocks, plan.q_steps),
        in_specs=in_specs,
        out_specs=[pl.BlockSpec((None, None, bk, hp), maps.kv_rows),
                   pl.BlockSpec((None, None, bk, vp), maps.kv_rows)],
        out_shape=[jax.ShapeDtypeStruct(kt.shape, k.dtype),
                   jax.ShapeDtypeStruct(vt.shape, v.dtype)],
        scratch_shapes=[pltpu.VMEM((bk, hp), jnp.float32), pltpu.VMEM((bk, vp), jnp.float32)],
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
        cost_estimate=_cost(plan, b, n, 4 * (h + v_dim), qt, kt, vt, dout_t),
        interpret=interpret,
        name="swa_flash_dkv",
    )(*inputs)
    return (_from_kernel_layout(dq, t, h), _from_kernel_layout(dk, t, h),
            _from_kernel_layout(dv, t, v_dim))


def _cost(plan: BlockPlan, b: int, n: int, flops_per_pair: int, *arrays) -> pl.CostEstimate:
    """What XLA's scheduler should expect: the visited tiles' matmuls, one exp per pair, the I/O."""
    pairs = b * n * plan.visited_pairs() * plan.block_q * plan.block_k
    return pl.CostEstimate(flops=pairs * flops_per_pair, transcendentals=pairs,
                           bytes_accessed=sum(x.size * x.dtype.itemsize for x in arrays))
