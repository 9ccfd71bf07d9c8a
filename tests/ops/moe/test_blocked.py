"""The blocked dispatch against its dense twin: values and gradients on fresh random inputs.

Padding is handled as `mimo_jax.model.moe.MoE` does: padding tokens are routed and dispatched
like any other (they take room in the blocks) and only the loss masks them out. Every case runs
both formulations (the CPU block loop and the batched matmul) and several block sizes.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mimo_jax.ops import moe as moe_ops
from mimo_jax.ops.moe import blocked as moe_blocked

DIM, FFN = 16, 12
TOL = 1e-5
FORMULATIONS = ("loop", "batched")


def _experts(rng, num_experts):
    """w_gate, w_up [E, D, F] and w_down [E, F, D]."""
    return tuple(jnp.asarray(rng.normal(scale=0.3, size=shape).astype(np.float32))
                 for shape in ((num_experts, DIM, FFN), (num_experts, DIM, FFN),
                               (num_experts, FFN, DIM)))


def _routed(rng, num_tokens, num_experts, top_k, allowed=None, x=None):
    """Tokens x [T, D] (random unless given) and the model's routing of them (weights, indices
    [T, k]); with `allowed`, the router's logits make only those experts choosable (the rest get
    no copies)."""
    if x is None:
        x = jnp.asarray(rng.normal(size=(num_tokens, DIM)).astype(np.float32))
    router = rng.normal(size=(DIM, num_experts)).astype(np.float32)
    logits = np.asarray(x) @ router
    if allowed is not None:
        banned = np.setdiff1d(np.arange(num_experts), allowed)
        logits[:, banned] = -30.0
    weights, indices, _ = moe_ops.route(jnp.asarray(logits), jnp.zeros((num_experts,)), top_k)
    return x, weights, indices


def _masked_loss(dispatch, token_mask, projection):
    """The model's pattern: every token is dispatched, padding is dropped by the loss."""
    def loss(x, weights, w_gate, w_up, w_down, indices):
        out = dispatch(x, weights, indices, w_gate, w_up, w_down)
        return jnp.sum(out * projection * token_mask[:, None])
    return loss


def _values_and_grads(dispatch, x, weights, indices, experts, token_mask, projection):
    """One compiled program: the output and the masked loss's gradients w.r.t. x, weights,
    w_gate, w_up and w_down."""
    loss = _masked_loss(dispatch, token_mask, projection)
    out = dispatch(x, weights, indices, *experts)
    return out, jax.grad(loss, argnums=(0, 1, 2, 3, 4))(x, weights, *experts, indices)


def _assert_twin(x, weights, indices, experts, token_mask, rng, **blocked_kwargs):
    """Values and gradients (x, weights, w_gate, w_up, w_down) of blocked == dense, to TOL."""
    projection = jnp.asarray(rng.normal(size=x.shape).astype(np.float32))
    blocked = functools.partial(moe_blocked.blocked_dispatch, **blocked_kwargs)
    run = jax.jit(_values_and_grads, static_argnums=0)
    out, grads = run(blocked, x, weights, indices, experts, token_mask, projection)
    expected, expected_grads = run(moe_ops.dense_dispatch, x, weights, indices, experts,
                                   token_mask, projection)
    np.testing.assert_allclose(np.asarray(out), np.asarray(expected), rtol=TOL, atol=TOL)
    for name, got, want in zip(("x", "weights", "w_gate", "w_up", "w_down"), grads,
                               expected_grads):
        scale = max(float(jnp.max(jnp.abs(want))), 1.0)
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=TOL, atol=TOL * scale,
                                   err_msg=f"gradient w.r.t. {name}")
    # Padding tokens get no gradient, yet their copies were computed (their outputs are right).
    assert not np.any(np.asarray(grads[0])[~np.asarray(token_mask)])


@pytest.mark.parametrize("formulation", FORMULATIONS)
@pytest.mark.parametrize("block_rows", [1, 16])
def test_matches_dense_with_padding_tokens(seed, formulation, block_rows):
    # 37 tokens, 3 of 6 experts each: T*k = 111 fills no block size evenly.
    rng = np.random.default_rng(seed)
    # Trailing padding rows all hold the same (pad) embedding, so they all pick the same experts.
    token_mask = jnp.arange(37) < 29
    x = jnp.asarray(rng.normal(size=(37, DIM)).astype(np.float32))
    x = jnp.where(token_mask[:, None], x, x[0])
    x, weights, indices = _routed(rng, 37, 6, 3, x=x)
    experts = _experts(rng, 6)
    _assert_twin(x, weights, indices, experts, token_mask, rng, block_rows=block_rows,
                 formulation=formulation)


@pytest.mark.parametrize("formulation", FORMULATIONS)
@pytest.mark.parametrize("top_k", [1, 3])
def test_skewed_load_all_copies_to_one_expert(seed, formulation, top_k):
    # The contract allows repeated experts in a row; the block layout must hold T*k copies of one
    # expert without dropping any.
    rng = np.random.default_rng(seed)
    x, weights, _ = _routed(rng, 21, 5, top_k)
    indices = jnp.full((21, top_k), 3, jnp.int32)
    _assert_twin(x, weights, indices, _experts(rng, 5), jnp.ones((21,), bool), rng,
                 block_rows=4, formulation=formulation)


@pytest.mark.parametrize("formulation", FORMULATIONS)
def test_empty_experts(seed, formulation):
    # Only experts 1, 4 and 6 of 8 are chosen; the rest hold no copies and no blocks.
    rng = np.random.default_rng(seed)
    x, weights, indices = _routed(rng, 30, 8, 2, allowed=[1, 4, 6])
    assert set(np.unique(np.asarray(indices))) == {1, 4, 6}
    _assert_twin(x, weights, indices, _experts(rng, 8), jnp.ones((30,), bool), rng,
                 block_rows=8, formulation=formulation)


@pytest.mark.parametrize("formulation", FORMULATIONS)
@pytest.mark.parametrize("top_k", [1, 5])
def test_k_one_and_k_all_experts(seed, formulation, top_k):
    rng = np.random.default_rng(seed)
    x, weights, indices = _routed(rng, 23, 5, top_k)
    token_mask = jnp.arange(23) % 7 != 0
    _assert_twin(x, weights, indices, _experts(rng, 5), token_mask, rng, block_rows=4,
                 formulation=formulation)


@pytest.mark.parametrize("formulation", FORMULATIONS)
def test_worst_case_block_count(seed, formulation):
    # Every expert gets one copy more than a multiple of the block: the static bound is reached.
    rng = np.random.default_rng(seed)
    num_experts, block_rows = 6, 4
    indices = jnp.asarray(rng.permutation(np.repeat(np.arange(num_experts), 5)), jnp.int32)
    indices = indices[:, None]  # [30, 1]
    layout = jax.jit(moe_blocked.block_layout, static_argnums=(1, 2))(indices, num_experts,
                                                                      block_rows)
    assert int(layout.used_blocks) == moe_blocked.max_blocks(30, num_experts, block_rows) == 12
    x, weights, _ = _routed(rng, 30, num_experts, 1)
    _assert_twin(x, weights, indices, _experts(rng, num_experts), jnp.ones((30,), bool), rng,
                 block_rows=block_rows, formulation=formulation)


def test_layout_maps_are_inverse_and_blocks_hold_one_expert(seed):
    rng = np.random.default_rng(seed)
    num_experts, block_rows = 7, 4
    _, _, indices = _routed(rng, 40, num_experts, 3, allowed=[0, 2, 3, 6])
    layout = jax.jit(moe_blocked.block_layout, static_argnums=(1, 2))(indices, num_experts,
                                                                      block_rows)
    slot_of_copy = np.asarray(layout.slot_of_copy)
    copy_of_slot = np.asarray(layout.copy_of_slot)
    block_expert = np.asarray(layout.block_expert)
    copies = 40 * 3
    np.testing.assert_array_equal(copy_of_slot[slot_of_copy], np.arange(copies))
    assert np.sum(copy_of_slot < copies) == copies  # every other slot is padding
    np.testing.assert_array_equal(block_expert[slot_of_copy // block_rows],
                                  np.asarray(indices).reshape(-1))
    # Used blocks come first, sorted by expert; the rest hold padding only.
    used = int(layout.used_blocks)
    assert np.all(np.diff(block_expert[:used]) >= 0)
    assert np.all(copy_of_slot[used * block_rows:] == copies)
    assert used <= block_expert.size == moe_blocked.max_blocks(copies, num_experts, block_rows)


def _plain_blocked(x, weights, indices, w_gate, w_up, w_down, block_rows):
    """The same block computation with plain gathers, differentiated by autodiff alone."""
    num_tokens, top_k = indices.shape
    layout = moe_blocked.block_layout(indices, w_gate.shape[0], block_rows)
    num_blocks = layout.block_expert.shape[0]
    x_blocks = jnp.take(x, layout.copy_of_slot // top_k, axis=0, mode="fill", fill_value=0)
    x_blocks = x_blocks.reshape(num_blocks, block_rows, -1)
    gate = jnp.einsum("jid,jdf->jif", x_blocks, w_gate[layout.block_expert])
    up = jnp.einsum("jid,jdf->jif", x_blocks, w_up[layout.block_expert])
    out = jnp.einsum("jif,jfd->jid", jax.nn.silu(gate) * up, w_down[layout.block_expert])
    out_copies = out.reshape(num_blocks * block_rows, -1)[layout.slot_of_copy]
    return jnp.einsum("tk,tkd->td", weights, out_copies.reshape(num_tokens, top_k, -1))


@pytest.mark.parametrize("formulation", FORMULATIONS)
def test_custom_gradients_match_plain_autodiff(seed, formulation):
    rng = np.random.default_rng(seed)
    x, weights, indices = _routed(rng, 19, 4, 2)
    experts = _experts(rng, 4)
    projection = jnp.asarray(rng.normal(size=x.shape).astype(np.float32))
    mask = jnp.ones((19,), bool)
    blocked = functools.partial(moe_blocked.blocked_dispatch, block_rows=4,
                                formulation=formulation)
    plain = functools.partial(_plain_blocked, block_rows=4)
    argnums = (0, 1, 2, 3, 4)
    got = jax.jit(jax.grad(_masked_loss(blocked, mask, projection), argnums))(
        x, weights, *experts, indices)
    want = jax.jit(jax.grad(_masked_loss(plain, mask, projection), argnums))(
        x, weights, *experts, indices)
    for g, w in zip(got, want):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=TOL, atol=TOL)


@pytest.mark.parametrize("formulation", FORMULATIONS)
def test_bfloat16_keeps_dtypes_and_tracks_float32(seed, formulation):
    rng = np.random.default_rng(seed)
    x, weights, indices = _routed(rng, 24, 4, 2)
    experts = _experts(rng, 4)
    to_bf16 = lambda tree: jax.tree.map(lambda a: a.astype(jnp.bfloat16), tree)  # noqa: E731
    blocked = functools.partial(moe_blocked.blocked_dispatch, block_rows=8,
                                formulation=formulation)
    out = jax.jit(blocked)(to_bf16(x), weights, indices, *to_bf16(experts))
    assert out.dtype == jnp.bfloat16
    reference = moe_ops.dense_dispatch(x, weights, indices, *experts)
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(reference), rtol=5e-2,
                               atol=5e-2)
    grads = jax.jit(jax.grad(
        lambda x, ws: jnp.sum(blocked(x, weights, indices, *ws).astype(jnp.float32)),
        argnums=(0, 1)))(to_bf16(x), to_bf16(experts))
    assert all(g.dtype == jnp.bfloat16 for g in jax.tree.leaves(grads))
    assert all(np.all(np.isfinite(np.asarray(g, np.float32))) for g in jax.tree.leaves(grads))


def test_default_block_rows_follows_the_load():
    assert moe_blocked.default_block_rows(4, 16) == 1  # decoding one token
    assert moe_blocked.default_block_rows(128, 16) == 8  # batch-32 decoding
    assert moe_blocked.default_block_rows(4096 * 4, 16) == moe_blocked.MAX_BLOCK_ROWS


def test_bad_arguments_are_named():
    rng = np.random.default_rng(0)
    x, weights, indices = _routed(rng, 8, 4, 2)
    experts = _experts(rng, 4)
    with pytest.raises(ValueError, match="block_rows=0"):
        moe_blocked.blocked_dispatch(x, weights, indices, *experts, block_rows=0)
    with pytest.raises(ValueError, match="'fused'"):
        moe_blocked.blocked_dispatch(x, weights, indices, *experts, formulation="fused")
