"""Context-parallel attention: the sequence is split into contiguous blocks over mesh axes.

Runs inside `jax.shard_map` over the whole mesh; shard c of P holds positions [c*T', (c+1)*T').

  sliding window W  a query sees at most the W-1 keys before it, so shard c needs only the last
                    W-1 keys/values/segment ids of the shards before it: a halo passed along the
                    ring with `ppermute` (one hop when W-1 <= T'), never an all-gather. The shard
                    then runs the local implementation it was given (any of `api.IMPLEMENTATIONS`,
                    kernels included) over [halo ; own block] and keeps its own rows. Shard 0's
                    halo is padding.
  global (causal)   K/V and segment ids are all-gathered over the context axes (GA layers have few
                    KV heads). With a block kernel (`block_attention`, the Pallas flash kernel),
                    shard c attends block by block: causally to its own block, fully to each
                    earlier shard's block, not at all to later ones (skipped: a `lax.switch`
                    runs no kernel), and merges the blocks by their log-sum-exps. Otherwise its
                    queries attend by chunks over all T keys at their global positions.

Packing is respected because segment ids travel with the keys; the halo's padding has segment 0,
which nothing sees. Other mesh axes (batch, heads) stay split as the PartitionSpecs say; when the
query heads are split and the KV heads are not, each shard slices out the KV heads its query heads
use.

Legend: B batch, T' local length, T global length, N query heads, K KV heads, G = N // K,
H q/k head dim, U value head dim, C query chunk, W window.
"""

from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from mimo_jax.ops.attention.pallas_common import EMPTY_ROW_LSE
from mimo_jax.ops.attention.reference import attention_mask, default_segments, masked_attention
from mimo_jax.ops.spec_axes import collective_axis, pad_spec, spec_axes


def is_context_sharded(q_spec: P | None,
                       mesh: jax.sharding.Mesh | jax.sharding.AbstractMesh | None = None) -> bool:
    """Whether the length entry of q's PartitionSpec splits the sequence on the current mesh."""
    if q_spec is None or len(q_spec) < 2:
        return False
    mesh = jax.sharding.get_abstract_mesh() if mesh is None else mesh
    if mesh.empty:
        return False
    sizes = dict(mesh.shape)
    return math.prod(sizes[a] for a in spec_axes(q_spec[1])) > 1


def _shift_from_previous(x: jax.Array, axis, num_shards: int, hops: int) -> jax.Array:
    """x of shard c - hops at shard c (zeros where c < hops)."""
    return jax.lax.ppermute(x, axis, [(i, i + hops) for i in range(num_shards - hops)])


def _halo(x: jax.Array, rows: int, axis, num_shards: int) -> jax.Array:
    """The `rows` positions just before this shard's block, from the shards before it.

    x: [B, T', ...] -> [B, rows, ...] (zeros before the sequence start).
    """
    local = x.shape[1]
    hops = -(-rows // local)
    blocks = [_shift_from_previous(x, axis, num_shards, j) for j in range(hops, 0, -1)]
    return jnp.concatenate(blocks, axis=1)[:, hops * local - rows:]


def _offset_attention(q, k, v, q_segments, k_segments, q_offset, sinks, chunk_size: int):
    """Causal attention of queries at global positions q_offset + [0, T') over all T keys.

    q: [B, T', N, H]; k: [B, T, K, H]; v: [B, T, K, U]; q_segments [B, T']; k_segments [B, T].
    Returns [B, T', N, U] float32. Each chunk is rematerialised in the backward pass so that only
    one chunk's [C, T] probabilities are alive at a time.
    """
    b, t_local, n, h = q.shape
    c = min(chunk_size, t_local)
    num_chunks = -(-t_local // c)
    pad = num_chunks * c - t_local
    if pad:
        q = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0)))
        q_segments = jnp.pad(q_segments, ((0, 0), (0, pad)))
    k_positions = jnp.broadcast_to(jnp.arange(k.shape[1], dtype=jnp.int32), k_segments.shape)
    q_chunks = jnp.moveaxis(q.reshape(b, num_chunks, c, n, h), 1, 0)
    seg_chunks = jnp.moveaxis(q_segments.reshape(b, num_chunks, c), 1, 0)
    starts = q_offset + jnp.arange(num_chunks, dtype=jnp.int32) * c

    @jax.checkpoint
    def one_chunk(args):
        qc, qs, start = args
        qp = jnp.broadcast_to(start + jnp.arange(c, dtype=jnp.int32), (b, c))
        mask = attention_mask(qp, k_positions, qs, k_segments, None)
        return masked_attention(qc, k, v, mask, sinks)

    out = jax.lax.map(one_chunk, (q_chunks, seg_chunks, starts))  # [chunks, B, C, N, U]
    out = jnp.moveaxis(out, 0, 1).reshape(b, num_chunks * c, n, v.shape[-1])
    return out[:, :t_local]


def _merge_blocks(outs: list[jax.Array], lses: list[jax.Array]) -> jax.Array:
    """Attention over several key blocks from each block's output [B, T', N, U] and row
    log-sum-exp [B, N, T']: each block weighted by its share exp(lse_block - lse_all)."""
    lse = jnp.stack(lses)  # [blocks, B, N, T']
    total = jax.nn.logsumexp(lse, axis=0)
    weights = jnp.exp(lse - total)  # rows that see nothing anywhere: equal weights of zeros
    weights = jnp.moveaxis(weights, -1, -2)[..., None]  # [blocks, B, T', N, 1]
    return sum(w * o.astype(jnp.float32) for w, o in zip(weights, outs))


def _blockwise_attention(q, k, v, q_segments, k_segments, shard, num_shards: int, sinks,
                         block_attention: Callable[..., tuple[jax.Array, jax.Array]]):
    """Causal attention of shard `shard`'s queries over the gathered keys, block by block with
    `block_attention` (`pallas.flash_attention_with_lse`'s contract): its own block causally
    (with the sinks), each earlier block in full, later blocks skipped.

    q: [B, T', N, H]; k: [B, T, K, H]; v: [B, T, K, U]; q_segments [B, T']; k_segments [B, T].
    Returns [B, T', N, U] float32.
    """
    b, t_local, n, _ = q.shape
    empty = (jnp.zeros((b, t_local, n, v.shape[-1]), q.dtype),
             jnp.full((b, n, t_local), EMPTY_ROW_LSE, jnp.float32))
    outs, lses = [], []
    for source in range(num_shards):
        block = slice(source * t_local, (source + 1) * t_local)
        kb, vb, sb = k[:, block], v[:, block], k_segments[:, block]

        def attend(causal: bool, kb=kb, vb=vb, sb=sb):
            # The sinks are one more key of each row: counted once, with the own block.
            return block_attention(q, kb, vb, sinks=sinks if causal else None,
                                   segment_ids=q_segments, kv_segment_ids=sb, causal=causal)

        branch = jnp.where(source < shard, 0, jnp.where(source == shard, 1, 2))
        out, lse = jax.lax.switch(branch, (lambda: attend(False), lambda: attend(True),
                                           lambda: empty))
        outs.append(out)
        lses.append(lse)
    return _merge_blocks(outs, lses)


def _local_kv_heads(k, v, n_local: int, n_total: int, head_axes) -> tuple[jax.Array, jax.Array]:
    """Slices the KV heads used by this shard's query heads (query heads split, KV heads whole)."""
    num_kv = k.shape[2]
    group = n_total // num_kv
    first = jax.lax.axis_index(head_axes) * n_local
    if n_local % group == 0:
        start, count = first // group, n_local // group
    elif group % n_local == 0:
        start, count = first // group, 1
    else:
        raise ValueError(f"{n_local} local query heads do not align with groups of {group} "
                         "query heads per KV head")
    return (jax.lax.dynamic_slice_in_dim(k, start, count, axis=2),
            jax.lax.dynamic_slice_in_dim(v, start, count, axis=2))


def attention(q: jax.Array, k: jax.Array, v: jax.Array, *, sinks: jax.Array | None,
              window: int | None, segment_ids: jax.Array | None,
              local_attention: Callable[..., jax.Array], chunk_size: int, q_spec: P, kv_spec: P,
              mesh: jax.sharding.Mesh | jax.sharding.AbstractMesh | None = None,
              block_attention: Callable[..., tuple[jax.Array, jax.Array]] | None = None
              ) -> jax.Array:
    """`mimo_jax.ops.attention.attention` with the sequence split over mesh axes.

    local_attention: `fn(q, k, v, *, sinks, window, segment_ids)` with the contract of
      `api.attention`, run on each shard's [halo ; own block] of a sliding-window layer.
    chunk_size: query chunk length of a global layer's attention over the gathered keys
      without a block kernel.
    block_attention: `pallas.flash_attention_with_lse` (or None): the kernel a global layer's
      shard runs per block of keys, skipping the blocks after its own.
    q_spec / kv_spec: mesh PartitionSpecs of q [batch, length, heads, head_dim] and of k and v
      [batch, length, kv_heads, head_dim]; their length entries must agree and name the context
      axes. Other arguments and the result are as in `api.attention`.
    """
    mesh = jax.sharding.get_abstract_mesh() if mesh is None else mesh
    q_spec, kv_spec = pad_spec(q_spec, 4), pad_spec(kv_spec, 4)
    if q_spec[1] != kv_spec[1] or q_spec[0] != kv_spec[0]:
        raise ValueError(f"q {q_spec} and k/v {kv_spec} must split batch and length alike")
    if q_spec[3] is not None or kv_spec[3] is not None:
        raise ValueError(f"context-parallel attention needs whole head dims, got q {q_spec}, "
                         f"k/v {kv_spec}")
    b, t, n, _ = q.shape
    context_axes = spec_axes(q_spec[1])
    sizes = dict(mesh.shape)
    num_shards = math.prod(sizes[a] for a in context_axes)
    if t % num_shards:
        raise ValueError(f"sequence length {t} does not split over context axes {context_axes} "
                         f"of size {num_shards}")
    head_axes, kv_head_axes = spec_axes(q_spec[2]), spec_axes(kv_spec[2])
    if kv_head_axes and kv_head_axes != head_axes:
        raise ValueError(f"KV heads split over {kv_head_axes} but query heads over {head_axes}")
    segment_ids = default_segments(segment_ids, b, t)
    axis = collective_axis(context_axes)
    has_sinks = sinks is not None

    def body(q, k, v, segments, *maybe_sinks):
        local_sinks = maybe_sinks[0] if has_sinks else None
        if head_axes and not kv_head_axes:
            k, v = _local_kv_heads(k, v, q.shape[2], n, collective_axis(head_axes))
        if window is not None:
            rows = window - 1
            if rows == 0:
                return local_attention(q, k, v, sinks=local_sinks, window=window,
                                       segment_ids=segments)
            halo_k, halo_v, halo_seg = (_halo(x, rows, axis, num_shards)
                                        for x in (k, v, segments))
            q_ext = jnp.concatenate([jnp.zeros((q.shape[0], rows) + q.shape[2:], q.dtype), q],
                                    axis=1)
            out = local_attention(
                q_ext, jnp.concatenate([halo_k, k], axis=1), jnp.concatenate([halo_v, v], axis=1),
                sinks=local_sinks, window=window,
                segment_ids=jnp.concatenate([halo_seg, segments], axis=1))
            return out[:, rows:]
        k_all, v_all, seg_all = (jax.lax.all_gather(x, axis, axis=1, tiled=True)
                                 for x in (k, v, segments))
        shard = jax.lax.axis_index(axis)
        if block_attention is not None:
            out = _blockwise_attention(q, k_all, v_all, segments, seg_all, shard, num_shards,
                                       local_sinks, block_attention)
        else:
            out = _offset_attention(q, k_all, v_all, segments, seg_all, shard * q.shape[1],
                                    local_sinks, chunk_size)
        return out.astype(q.dtype)

    seg_spec = P(q_spec[0], q_spec[1])
    in_specs = (q_spec, kv_spec, kv_spec, seg_spec) + ((P(q_spec[2]),) if has_sinks else ())
    out_spec = P(q_spec[0], q_spec[1], q_spec[2], None)
    # check_vma=False: a Pallas kernel's outputs carry no varying-axes type, which the checked
    # mode requires of every value; the replicated sinks' gradient is then summed over the
    # shards by shard_map's unchecked transpose.
    mapped = jax.shard_map(body, mesh=mesh, in_specs=in_specs, out_specs=out_spec,
                           check_vma=False)
    args = (q, k, v, segment_ids) + ((sinks,) if has_sinks else ())
    return mapped(*args)
