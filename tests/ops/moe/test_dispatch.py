"""The shared test base of MoE dispatch: every backend in `ops.moe.IMPLEMENTATIONS` held to a plain
numpy loop (values) and to the dense twin (gradients through the router), on a random and a skewed
load, with padding tokens (their output is exactly zero). The expert-parallel backend also runs on
meshes that split the experts (all-to-all exchange of token copies). Backend-specific checks
(dropping past a small receive buffer, the transports) are in test_expert_parallel.py.

Errors are measured as max |actual - expected| / max |expected| per array.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from compile_options import QUICK_COMPILE
from mimo_jax.ops import moe as moe_ops
from mimo_jax.ops.moe.local_choice import fastest_one_device_impl
from mimo_jax.parallel import Parallelism, mesh_config_from_dict
from mimo_jax.parallel.rules import mesh_axes
from attention_inputs import relative_error

B, T, D, E, K, F = 8, 6, 16, 8, 2, 12
# Correction biases: none (random load) or one that sends most copies to expert 0 and none to
# experts 6 and 7.
BIASES = {"random": np.zeros(E, np.float32),
          "skewed": np.array([4.0, 0, 0, 0, 0, 0, -4.0, -4.0], np.float32)}


def _problem(seed: int):
    """x [B, T, D], router logits [B*T, E], token mask [B, T] (two rows end in padding) and the
    expert weights (w_gate, w_up [E, D, F], w_down [E, F, D])."""
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=(B, T, D)), jnp.float32)
    logits = jnp.asarray(rng.normal(size=(B * T, E)), jnp.float32)
    experts = tuple(jnp.asarray(rng.normal(scale=0.3, size=s), jnp.float32)
                    for s in ((E, D, F), (E, D, F), (E, F, D)))
    mask = np.ones((B, T), bool)
    mask[1, 4:] = False
    mask[6, 1:] = False
    return x, logits, jnp.asarray(mask), experts


def _routed(logits, load: str):
    weights, indices, _ = moe_ops.route(logits, jnp.asarray(BIASES[load]), K)
    return weights.reshape(B, T, K), indices.reshape(B, T, K)


def _numpy_moe(x, weights, indices, mask, experts):
    """Sum over each real token's k experts of gate weight x SwiGLU expert; padding gets 0."""
    x, weights, indices, mask = (np.asarray(a, np.float64) for a in (x, weights, indices, mask))
    w_gate, w_up, w_down = (np.asarray(w, np.float64) for w in experts)
    out = np.zeros_like(x)
    for b, t in zip(*np.nonzero(mask)):
        for w, e in zip(weights[b, t], indices[b, t].astype(int)):
            gate, up = x[b, t] @ w_gate[e], x[b, t] @ w_up[e]
            out[b, t] += w * ((gate / (1 + np.exp(-gate))) * up) @ w_down[e]
    return out


@pytest.mark.parametrize("load", list(BIASES))
@pytest.mark.parametrize("impl", moe_ops.IMPLS)
def test_values_match_numpy(impl, load):
    x, logits, mask, experts = _problem(seed=1)
    weights, indices = _routed(logits, load)
    counts = np.bincount(np.asarray(indices)[np.asarray(mask)].ravel(), minlength=E)
    if load == "skewed":  # the load really is skewed: some experts idle, one with most copies
        assert counts.min() == 0 and counts.max() > 3 * counts.mean()
    out = moe_ops.dispatch(x, weights, indices, *experts, impl=impl, token_mask=mask)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert relative_error(out, _numpy_moe(x, weights, indices, mask, experts)) <= 1e-5
    np.testing.assert_array_equal(np.asarray(out)[~np.asarray(mask)], 0.0)


def _loss_and_grads(impl: str, load: str, x, logits, mask, experts):
    """sum(out * sin(out)), out = dispatch(route(logits)), and its gradients (x, logits, w_gate,
    w_up, w_down)."""
    def loss(x, logits, *experts):
        weights, indices = _routed(logits, load)
        out = moe_ops.dispatch(x, weights, indices, *experts, impl=impl, token_mask=mask)
        return jnp.sum(out * jnp.sin(out))
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4)))(x, logits, *experts)


@functools.cache
def _dense_twin():
    """The dense backend's loss and gradients, computed once for every other backend."""
    return _loss_and_grads("dense", "skewed", *_problem(seed=2))


@pytest.mark.parametrize("impl", [name for name in moe_ops.IMPLS if name != "dense"])
def test_gradients_match_the_dense_twin(impl):
    """On the skewed load (idle experts get no gradient; the busy one most of it)."""
    value, grads = _loss_and_grads(impl, "skewed", *_problem(seed=2))
    want_value, want_grads = _dense_twin()
    assert relative_error(value, want_value) <= 1e-5
    for name, got, want in zip(("dx", "dlogits", "dw_gate", "dw_up", "dw_down"), grads,
                               want_grads):
        assert np.abs(np.asarray(want)).max() > 0, name
        assert relative_error(got, want) <= 1e-5, name


@pytest.mark.parametrize("preset, ici", [
    ("fsdp_ep", "fsdp=2,expert=4"),  # expert weights' model dim gathered over fsdp
    ("fsdp_tp_ep", "fsdp=2,expert=2,tensor=2"),  # expert hidden dim split: partial sums + psum
])
def test_expert_parallel_on_a_mesh_matches_the_dense_twin(preset, ici):
    """Dropless exchange over the expert axes: values and gradients (x, gate weights, experts)."""
    parallelism = Parallelism.from_config(mesh_config_from_dict(dict(ici=ici, rules=preset)))
    axes = (mesh_axes(("batch", "length", "embed"), parallelism.rules),
            mesh_axes(("experts", "embed", "mlp"), parallelism.rules))
    x, logits, mask, experts = _problem(seed=0)
    weights, indices = _routed(logits, "random")
    probe = jax.random.normal(jax.random.PRNGKey(9), (B, T, D))

    def values_and_grads(impl, axes):
        def run(x, weights, experts):
            return moe_ops.dispatch(x, weights, indices, *experts, impl=impl, token_mask=mask,
                                    mesh_axes=axes)
        return lambda x, weights, experts: (run(x, weights, experts), jax.grad(
            lambda *a: jnp.sum(run(*a) * probe), argnums=(0, 1, 2))(x, weights, experts))

    got, got_grads = parallelism.jit(values_and_grads("expert_parallel", axes), None, None,
                                     compiler_options=QUICK_COMPILE)(x, weights, experts)
    want, want_grads = jax.jit(values_and_grads("dense", None),
                               compiler_options=QUICK_COMPILE)(x, weights, experts)
    assert relative_error(got, want) <= 1e-5
    np.testing.assert_array_equal(np.asarray(got)[~np.asarray(mask)], 0.0)
    for got_leaf, want_leaf in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads)):
        assert relative_error(got_leaf, want_leaf) <= 1e-5


def test_flat_tokens_and_a_bad_impl():
    """The one-device backends also take tokens [T, D]; an unknown backend is named."""
    x, logits, _, experts = _problem(seed=3)
    weights, indices = _routed(logits, "random")
    batched = moe_ops.dispatch(x, weights, indices, *experts, impl="ragged")
    flat = moe_ops.dispatch(x.reshape(B * T, D), weights.reshape(B * T, K),
                            indices.reshape(B * T, K), *experts, impl="ragged")
    np.testing.assert_array_equal(np.asarray(flat), np.asarray(batched).reshape(B * T, D))
    with pytest.raises(ValueError, match="MoE impl 'sparse'"):
        moe_ops.dispatch(x, weights, indices, *experts, impl="sparse")
    with pytest.raises(ValueError, match=r"needs tokens \[B, T, D\]"):
        moe_ops.dispatch(x.reshape(B * T, D), weights.reshape(B * T, K),
                         indices.reshape(B * T, K), *experts, impl="expert_parallel")


@pytest.mark.parametrize("impl", ["dense", "ragged", "blocked"])
def test_few_tokens_read_only_their_experts(impl):
    """With T*k < E (decoding at batch 1-3 here) every one-device backend runs the gathered
    dispatch: experts no token chose may hold NaN and the output is still the numpy value."""
    x, logits, _, experts = _problem(seed=4)
    tokens = E // K - 1  # the most tokens with T*k < E
    x, logits = x.reshape(B * T, D)[:tokens], logits[:tokens]
    weights, indices, _ = moe_ops.route(logits, jnp.zeros(E), K)
    unused = np.setdiff1d(np.arange(E), np.asarray(indices))
    assert unused.size > 0
    poisoned = tuple(w.at[unused].set(jnp.nan) for w in experts)
    out = moe_ops.dispatch(x, weights, indices, *poisoned, impl=impl)
    want = _numpy_moe(x[None], weights[None], indices[None], np.ones((1, tokens), bool),
                      experts)[0]
    assert relative_error(out, want) <= 1e-5
    # At T*k >= E the backend itself runs: the dense one reads (and here propagates) every expert.
    if impl == "dense":
        x_more = jnp.concatenate([x, x[:1]])
        w_more, i_more, _ = moe_ops.route(jnp.concatenate([logits, logits[:1]]), jnp.zeros(E), K)
        assert np.isnan(np.asarray(moe_ops.dispatch(x_more, w_more, i_more, *poisoned,
                                                    impl="dense"))).any()


def test_auto_runs_expert_parallel_on_split_experts_and_else_the_fastest_local_dispatch():
    """The rule of `impl="auto"` (`local_choice`): expert parallelism where the mesh splits the
    experts, the blocked dispatch on one CPU device, ragged dot on TPU and GPU."""
    parallelism = Parallelism.from_config(mesh_config_from_dict(dict(ici="fsdp=2,expert=4",
                                                                     rules="fsdp_ep")))
    axes = (mesh_axes(("batch", "length", "embed"), parallelism.rules),
            mesh_axes(("experts", "embed", "mlp"), parallelism.rules))
    fsdp_only = Parallelism.from_config(mesh_config_from_dict(dict(ici="fsdp=8", rules="fsdp")))
    with jax.set_mesh(parallelism.mesh):
        assert moe_ops.resolve_impl("auto", axes) == "expert_parallel"
        assert moe_ops.resolve_impl("ragged", axes) == "ragged"
    with jax.set_mesh(fsdp_only.mesh):
        local_axes = (None, mesh_axes(("experts", "embed", "mlp"), fsdp_only.rules))
        assert moe_ops.resolve_impl("auto", local_axes) == "blocked"
    assert moe_ops.resolve_impl("auto", None) == "blocked"
    assert [fastest_one_device_impl(b) for b in ("cpu", "tpu", "gpu")] == [
        "blocked", "ragged", "ragged"]
