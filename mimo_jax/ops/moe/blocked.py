"""Routed-only dropless MoE dispatch on fixed-size expert blocks: dense GEMMs on every backend.

The T*k token copies are sorted by expert and laid into J blocks of I rows, each block holding
copies of one expert only (each expert's group is padded up to a multiple of I). Every block is
then one dense [I, D] x [D, F] product with its expert's weights, run as a batched matmul over
blocks, so the work is the routed copies plus at most I - 1 padding rows per used expert, never
E/k times the tokens as in the dense twin. J is static: at most floor((T*k + m (I - 1)) / I) for
m = min(E, T*k) used experts, whatever the load, so nothing is ever dropped.

Legend (beside mimo_jax/shapes.md): J blocks, I rows per block; slots are the J*I padded rows.

Every data movement is a gather, in both directions: a copy's slot and a slot's copy are inverse
maps, so the transpose of "slots read copies" is "copies read slots". Custom VJPs say so, which
keeps autodiff from emitting scatter-adds (slow on XLA:CPU, serialised on accelerators); the
per-block weight gradients are summed per expert with one small one-hot contraction.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from mimo_jax.ops.moe.ragged import sort_by_expert

# Rows per block for large batches: big enough for efficient GEMMs, small enough that the padding
# (at most I - 1 rows per used expert) stays a small share of T*k.
MAX_BLOCK_ROWS = 256
# On CPU the block loop wins from 2 rows a block: the batched formulation copies every block's
# expert weights, and at 2-4 rows a block there are more blocks than experts (J = 24-28 copies
# of E = 16 experts at 8-24 tokens, k = 4, D = F = 256: 2-3x slower than the loop, measured).
# Single-row blocks (T*k < 2E, decoding at batch 1-7) run as one batched matmul.
MIN_LOOP_BLOCK_ROWS = 2


class BlockLayout(NamedTuple):
    """Where each token copy sits in the padded block layout (copy c is token c // k, choice
    c % k).

    slot_of_copy: [T*k] int32, the slot of each copy.
    copy_of_slot: [J*I] int32, the copy in each slot; T*k marks a padding slot.
    block_expert: [J] int32, the expert of each block (unused trailing blocks repeat E - 1 and
      hold only padding).
    used_blocks: [] int32, the blocks that hold copies (the first ones; the rest are unused).
    """

    slot_of_copy: jax.Array
    copy_of_slot: jax.Array
    block_expert: jax.Array
    used_blocks: jax.Array


def default_block_rows(num_copies: int, num_experts: int) -> int:
    """Rows per block: the largest power of two not above the mean copies per expert, in
    [1, MAX_BLOCK_ROWS].

    Small batches (decoding) get small blocks, so the blocks read little more than the chosen
    experts' weights; large batches get GEMM-sized blocks.
    """
    mean_rows = max(num_copies / num_experts, 1.0)
    rows = 1
    while rows * 2 <= mean_rows and rows * 2 <= MAX_BLOCK_ROWS:
        rows *= 2
    return rows


def max_blocks(num_copies: int, num_experts: int, block_rows: int) -> int:
    """Blocks needed for any routing of `num_copies` copies over `num_experts` experts.

    Each used expert pads its group by at most I - 1 rows, and at most min(E, T*k) experts are
    used, so the slots never exceed T*k + m (I - 1).
    """
    used = min(num_experts, num_copies)
    return max((num_copies + used * (block_rows - 1)) // block_rows, 1)


def block_layout(indices: jax.Array, num_experts: int, block_rows: int) -> BlockLayout:
    """The padded block layout of the copies routed by `indices` [T, k] (no gradients)."""
    num_copies = indices.size
    num_blocks = max_blocks(num_copies, num_experts, block_rows)
    order, group_sizes, sorted_expert = sort_by_expert(indices, num_experts)
    group_starts = jnp.cumsum(group_sizes) - group_sizes  # [E]
    blocks_per_expert = (group_sizes + block_rows - 1) // block_rows
    block_ends = jnp.cumsum(blocks_per_expert)  # [E]
    slot_starts = (block_ends - blocks_per_expert) * block_rows  # [E]

    rank = jnp.arange(num_copies, dtype=jnp.int32) - group_starts[sorted_expert]
    sorted_slot = slot_starts[sorted_expert] + rank  # [T*k], slot of the i-th sorted copy
    slot_of_copy = jnp.zeros((num_copies,), jnp.int32).at[order].set(sorted_slot)

    block_ids = jnp.arange(num_blocks, dtype=jnp.int32)
    # A block belongs to the first expert whose block range ends after it.
    block_expert = jnp.sum(block_ends[None, :] <= block_ids[:, None], axis=1, dtype=jnp.int32)
    block_expert = jnp.minimum(block_expert, num_experts - 1)
    slots = jnp.arange(num_blocks * block_rows, dtype=jnp.int32)
    slot_expert = jnp.repeat(block_expert, block_rows, total_repeat_length=slots.size)
    slot_rank = slots - slot_starts[slot_expert]
    is_copy = slot_rank < group_sizes[slot_expert]
    sorted_index = jnp.minimum(group_starts[slot_expert] + slot_rank, num_copies - 1)
    copy_of_slot = jnp.where(is_copy, order[sorted_index].astype(jnp.int32), num_copies)
    return BlockLayout(slot_of_copy, copy_of_slot, block_expert, block_ends[-1])


def _take_rows(rows: jax.Array, index: jax.Array) -> jax.Array:
    """rows[index], zeros where index is out of range (padding)."""
    return jnp.take(rows, index, axis=0, mode="fill", fill_value=0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def tokens_to_slots(x: jax.Array, copy_of_slot: jax.Array, slot_of_copy: jax.Array,
                    top_k: int) -> jax.Array:
    """x [T, D] -> [J*I, D]: each slot holds its copy's token (zeros in padding slots).

    `slot_of_copy` (the inverse map) is for the backward pass, which reads instead of scatters.
    """
    del slot_of_copy
    return _take_rows(x, copy_of_slot // top_k)


def _tokens_to_slots_fwd(x, copy_of_slot, slot_of_copy, top_k):
    return tokens_to_slots(x, copy_of_slot, slot_of_copy, top_k), slot_of_copy


def _tokens_to_slots_bwd(top_k, slot_of_copy, slots_grad):
    per_copy = jnp.take(slots_grad, slot_of_copy, axis=0)  # [T*k, D]
    x_grad = jnp.sum(per_copy.reshape(-1, top_k, per_copy.shape[-1]), axis=1)
    return x_grad, None, None


tokens_to_slots.defvjp(_tokens_to_slots_fwd, _tokens_to_slots_bwd)


@jax.custom_vjp
def slots_to_copies(slot_rows: jax.Array, slot_of_copy: jax.Array,
                    copy_of_slot: jax.Array) -> jax.Array:
    """[J*I, D] -> [T*k, D]: each copy reads its slot's row (padding slots are never read).

    `copy_of_slot` (the inverse map) is for the backward pass, which reads instead of scatters.
    """
    del copy_of_slot
    return jnp.take(slot_rows, slot_of_copy, axis=0)


def _slots_to_copies_fwd(slot_rows, slot_of_copy, copy_of_slot):
    return slots_to_copies(slot_rows, slot_of_copy, copy_of_slot), copy_of_slot


def _slots_to_copies_bwd(copy_of_slot, copies_grad):
    return _take_rows(copies_grad, copy_of_slot), None, None


slots_to_copies.defvjp(_slots_to_copies_fwd, _slots_to_copies_bwd)


@jax.custom_vjp
def expert_blocks(weight: jax.Array, block_expert: jax.Array) -> jax.Array:
    """[E, ...] -> [J, ...]: each block's expert weight."""
    return jnp.take(weight, block_expert, axis=0)


def _expert_blocks_fwd(weight, block_expert):
    return expert_blocks(weight, block_expert), (block_expert, weight.shape[0])


def _expert_blocks_bwd(residuals, blocks_grad):
    block_expert, num_experts = residuals
    # A one-hot contraction over J blocks: a GEMM where scatter-add would run row by row.
    hits = jax.nn.one_hot(block_expert, num_experts, dtype=blocks_grad.dtype)  # [J, E]
    flat = blocks_grad.reshape(blocks_grad.shape[0], -1)
    weight_grad = jnp.einsum("je,jx->ex", hits, flat, precision=jax.lax.Precision.HIGHEST)
    return weight_grad.reshape((num_experts,) + blocks_grad.shape[1:]), None


expert_blocks.defvjp(_expert_blocks_fwd, _expert_blocks_bwd)


def experts_batched(x_blocks: jax.Array, layout: BlockLayout, w_gate: jax.Array,
                    w_up: jax.Array, w_down: jax.Array) -> jax.Array:
    """SwiGLU experts as one batched matmul over all J blocks (the accelerator formulation).

    Each block gets its own copy of its expert's weights ([J, D, F] per matrix), which is cheap
    for small experts and for decoding (J near k) but grows with T*k / I for large ones.
    x_blocks: [J, I, D]. Returns [J, I, D] float32 (zeros in padding rows).
    """
    gate = jnp.einsum("jid,jdf->jif", x_blocks, expert_blocks(w_gate, layout.block_expert))
    up = jnp.einsum("jid,jdf->jif", x_blocks, expert_blocks(w_up, layout.block_expert))
    return jnp.einsum("jif,jfd->jid", jax.nn.silu(gate) * up,
                      expert_blocks(w_down, layout.block_expert),
                      preferred_element_type=jnp.float32)


def _row(array: jax.Array, index: jax.Array) -> jax.Array:
    return jax.lax.dynamic_index_in_dim(array, index, axis=0, keepdims=False)


def _set_row(array: jax.Array, row: jax.Array, index: jax.Array) -> jax.Array:
    return jax.lax.dynamic_update_index_in_dim(array, row.astype(array.dtype), index, axis=0)


def _add_row(array: jax.Array, row: jax.Array, index: jax.Array) -> jax.Array:
    return _set_row(array, _row(array, index) + row, index)


def _experts_loop_forward(x_blocks, block_expert, used_blocks, w_gate, w_up, w_down):
    """Returns the output blocks and the gate and up activations the backward pass reuses."""
    num_blocks, block_rows, _ = x_blocks.shape
    ffn = w_gate.shape[-1]

    def block(j, buffers):
        out, gate, up = buffers
        expert, rows = block_expert[j], _row(x_blocks, j)
        gate_j = rows @ _row(w_gate, expert)  # [I, F]
        up_j = rows @ _row(w_up, expert)
        out_j = jnp.matmul(jax.nn.silu(gate_j) * up_j, _row(w_down, expert),
                           preferred_element_type=jnp.float32)  # [I, D]
        return _set_row(out, out_j, j), _set_row(gate, gate_j, j), _set_row(up, up_j, j)

    hidden_shape = (num_blocks, block_rows, ffn)
    buffers = (jnp.zeros(x_blocks.shape, jnp.float32), jnp.zeros(hidden_shape, x_blocks.dtype),
               jnp.zeros(hidden_shape, x_blocks.dtype))
    # Only the used blocks run: the trailing ones of the static bound hold padding only.
    return jax.lax.fori_loop(0, used_blocks, block, buffers)


@jax.custom_vjp
def _experts_loop(x_blocks, block_expert, used_blocks, w_gate, w_up, w_down):
    return _experts_loop_forward(x_blocks, block_expert, used_blocks, w_gate, w_up, w_down)[0]


def _experts_loop_fwd(x_blocks, block_expert, used_blocks, w_gate, w_up, w_down):
    out, gate, up = _experts_loop_forward(x_blocks, block_expert, used_blocks, w_gate, w_up,
                                          w_down)
    return out, (x_blocks, block_expert, used_blocks, w_gate, w_up, w_down, gate, up)


def _experts_loop_bwd(residuals, out_grad):
    x_blocks, block_expert, used_blocks, w_gate, w_up, w_down, gate, up = residuals

    def block(j, grads):
        x_grad, gate_grad, up_grad, down_grad = grads
        expert, rows, out_grad_j = block_expert[j], _row(x_blocks, j), _row(out_grad, j)
        gate_j = _row(gate, j).astype(jnp.float32)
        up_j = _row(up, j).astype(jnp.float32)
        sigmoid = jax.nn.sigmoid(gate_j)
        silu = gate_j * sigmoid
        hidden_grad = out_grad_j @ _row(w_down, expert).astype(jnp.float32).T  # [I, F]
        up_grad_j = hidden_grad * silu
        gate_grad_j = hidden_grad * up_j * sigmoid * (1.0 + gate_j * (1.0 - sigmoid))
        compute = x_blocks.dtype
        rows_grad = (gate_grad_j.astype(compute) @ _row(w_gate, expert).T
                     + up_grad_j.astype(compute) @ _row(w_up, expert).T)  # [I, D]
        # Blocks of one expert are consecutive; each adds its share into that expert's slice.
        gate_grad = _add_row(gate_grad, rows.T.astype(jnp.float32) @ gate_grad_j, expert)
        up_grad = _add_row(up_grad, rows.T.astype(jnp.float32) @ up_grad_j, expert)
        down_grad = _add_row(down_grad, (silu * up_j).T @ out_grad_j, expert)
        return _set_row(x_grad, rows_grad, j), gate_grad, up_grad, down_grad

    grads = (jnp.zeros_like(x_blocks), jnp.zeros(w_gate.shape, jnp.float32),
             jnp.zeros(w_up.shape, jnp.float32), jnp.zeros(w_down.shape, jnp.float32))
    x_grad, gate_grad, up_grad, down_grad = jax.lax.fori_loop(0, used_blocks, block, grads)
    return (x_grad, None, None, gate_grad.astype(w_gate.dtype), up_grad.astype(w_up.dtype),
            down_grad.astype(w_down.dtype))


_experts_loop.defvjp(_experts_loop_fwd, _experts_loop_bwd)


def experts_loop(x_blocks: jax.Array, layout: BlockLayout, w_gate: jax.Array, w_up: jax.Array,
                 w_down: jax.Array) -> jax.Array:
    """SwiGLU experts one block at a time, over the used blocks only (the CPU formulation).

    Each block reads its expert's weights in place, so no [J, D, F] copy of the weights is
    made, and the backward pass adds each block's weight gradient into its expert's slice.
    x_blocks: [J, I, D]. Returns [J, I, D] float32 (zeros in padding rows and unused blocks).
    """
    return _experts_loop(x_blocks, layout.block_expert, layout.used_blocks, w_gate, w_up, w_down)


FORMULATIONS = {"loop": experts_loop, "batched": experts_batched}


def blocked_dispatch(x: jax.Array, weights: jax.Array, indices: jax.Array, w_gate: jax.Array,
                     w_up: jax.Array, w_down: jax.Array, *, block_rows: int | None = None,
                     formulation: str | None = None) -> jax.Array:
    """Dropless routed-only dispatch over expert blocks. Same contract as
    `mimo_jax.ops.moe.dense_dispatch`.

    x: [T, D]; weights, indices: [T, k]; w_gate, w_up: [E, D, F]; w_down: [E, F, D].
    block_rows: rows per block (I); default `default_block_rows(T*k, E)`.
    formulation: "loop" (one block at a time, used blocks only; the default on CPU for blocks of
      at least `MIN_LOOP_BLOCK_ROWS` rows) or "batched" (one batched matmul over all blocks; the
      default elsewhere).
    Returns [T, D].
    """
    num_tokens, top_k = indices.shape
    num_experts, dim, _ = w_gate.shape
    if block_rows is None:
        block_rows = default_block_rows(num_tokens * top_k, num_experts)
    if block_rows < 1:
        raise ValueError(f"block_rows={block_rows} must be >= 1")
    if formulation is None:
        on_cpu = jax.default_backend() == "cpu"
        formulation = "loop" if on_cpu and block_rows >= MIN_LOOP_BLOCK_ROWS else "batched"
    if formulation not in FORMULATIONS:
        raise ValueError(f"formulation {formulation!r} is not one of {tuple(FORMULATIONS)}")
    layout = block_layout(indices, num_experts, block_rows)
    num_blocks = layout.block_expert.shape[0]

    x_blocks = tokens_to_slots(x, layout.copy_of_slot, layout.slot_of_copy, top_k)
    x_blocks = x_blocks.reshape(num_blocks, block_rows, dim)  # [J, I, D]
    out_blocks = FORMULATIONS[formulation](x_blocks, layout, w_gate, w_up, w_down)
    out_copies = slots_to_copies(out_blocks.reshape(num_blocks * block_rows, dim),
                                 layout.slot_of_copy, layout.copy_of_slot)  # [T*k, D]
    combined = jnp.einsum("tk,tkd->td", weights.astype(jnp.float32),
                          out_copies.reshape(num_tokens, top_k, dim))
    return combined.astype(x.dtype)
