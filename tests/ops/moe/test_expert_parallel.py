"""What is particular to expert-parallel dispatch (`ops/moe/expert_parallel.py`): the capacity's
drop rule and drop count (against numpy), the dense stand-in's `ragged_all_to_all` contract, and the
ragged transport in the lowered program, and the options travelling from the model's runtime
config through the MoE layer. Values and gradients against the dense twin are in the shared cases
of test_dispatch.py."""

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

import parallel_helpers as ph
from compile_options import QUICK_COMPILE
from mimo_jax.config import with_runtime
from mimo_jax.model.moe import MoE
from mimo_jax.model.transformer import MiMoV2Flash, init_params
from mimo_jax.ops import moe as moe_ops
from mimo_jax.ops.moe import expert_parallel as ep
from mimo_jax.parallel import Parallelism, mesh_config_from_dict
from mimo_jax.parallel.rules import mesh_axes

B, T, D, E, K, F = 8, 6, 16, 8, 2, 12


def _problem(seed: int = 0):
    keys = jax.random.split(jax.random.PRNGKey(seed), 6)
    x = jax.random.normal(keys[0], (B, T, D))
    weights, indices, _ = moe_ops.route(jax.random.normal(keys[1], (B * T, E)), jnp.zeros(E), K)
    w_gate = 0.3 * jax.random.normal(keys[2], (E, D, F))
    w_up = 0.3 * jax.random.normal(keys[3], (E, D, F))
    w_down = 0.3 * jax.random.normal(keys[4], (E, F, D))
    mask = np.ones((B, T), bool)
    mask[1, 4:] = False
    mask[6, 1:] = False
    return (x, weights.reshape(B, T, K), indices.reshape(B, T, K), jnp.asarray(mask),
            (w_gate, w_up, w_down))


def _skewed_problem(seed: int):
    """Tokens, gate weights and expert ids where expert 0 is in most tokens' top-k (a router
    logit bias of +3), with random padding: a load that overflows any balanced capacity."""
    keys = jax.random.split(jax.random.PRNGKey(seed), 3)
    x = jax.random.normal(keys[0], (B, T, D))
    logits = jax.random.normal(keys[1], (B * T, E)).at[:, 0].add(3.0)
    weights, indices, _ = moe_ops.route(logits, jnp.zeros(E), K)
    mask = np.asarray(jax.random.uniform(keys[2], (B, T)) > 0.2)
    return x, weights.reshape(B, T, K), indices.reshape(B, T, K), jnp.asarray(mask)


def _expert_parallel(parallelism, options, with_drops=False):
    token_spec = mesh_axes(("batch", "length", "embed"), parallelism.rules)
    weight_spec = mesh_axes(("experts", "embed", "mlp"), parallelism.rules)

    def run(x, weights, indices, mask, w):
        return ep.dispatch(x, weights, indices, *w, token_mask=mask, token_spec=token_spec,
                           weight_spec=weight_spec, options=options, with_drops=with_drops)
    return run


def _dropping_reference(x, weights, indices, mask, w, shards, quota):
    """numpy: each source shard keeps, for each expert, its `quota` copies of the largest gate
    weight (ties: the earlier copy) and drops the rest; the output sums the kept copies.
    Returns the output, the kept and the real copy counts."""
    x, weights, indices, mask = map(np.asarray, (x, weights, indices, mask))
    tokens = x.reshape(shards, -1, D)  # shard s holds rows [s*B/shards, ...)
    flat_w, flat_i = weights.reshape(shards, -1, K), indices.reshape(shards, -1, K)
    flat_m = mask.reshape(shards, -1)
    kept = np.zeros(flat_w.shape, bool)
    for source in range(shards):
        for expert in range(E):
            copies = [(t, j) for t in range(flat_i.shape[1]) for j in range(K)
                      if flat_i[source, t, j] == expert and flat_m[source, t]]
            copies.sort(key=lambda c: -flat_w[source, c[0], c[1]])  # stable: ties keep order
            for t, j in copies[:quota]:
                kept[source, t, j] = True
    w_gate, w_up, w_down = map(np.asarray, w)
    out = np.zeros(tokens.shape)
    for s in range(shards):
        for t in range(tokens.shape[1]):
            for j in range(K):
                if kept[s, t, j]:
                    e = flat_i[s, t, j]
                    gate, up = tokens[s, t] @ w_gate[e], tokens[s, t] @ w_up[e]
                    out[s, t] += flat_w[s, t, j] * ((gate / (1 + np.exp(-gate)) * up) @ w_down[e])
    return out.reshape(x.shape), kept.sum(), mask.sum() * K


def test_capacity_keeps_each_experts_largest_gate_weights_and_counts_the_drops():
    """Capacity factor 0.5: every source shard sends each expert at most
    q = ceil(0.5 * T_local * k / E) copies, those of the largest gate weights; the output sums
    the kept copies (against numpy) and `with_drops` counts the others."""
    parallelism = Parallelism.from_config(
        mesh_config_from_dict(dict(ici="expert=4,fsdp=2", rules="fsdp_ep")))
    x, weights, indices, mask = _skewed_problem(seed=1)
    options = ep.ExpertParallelOptions(capacity_factor=0.5, transport="all_to_all")
    run = _expert_parallel(parallelism, options, with_drops=True)
    got, dropped = parallelism.jit(run, None, None, compiler_options=QUICK_COMPILE)(
        x, weights, indices, mask, _problem()[4])
    # Tokens split over fsdp x expert = 8 shards of B*T/8 rows each; every shard is a source.
    quota = ep.expert_quota(B * T // 8, K, E, 0.5)
    want, kept, total = _dropping_reference(x, weights, indices, mask, _problem()[4], 8, quota)
    assert 0 < kept < total  # the capacity really drops some copies
    assert int(dropped) == total - kept
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


def test_dropless_counts_no_drops_under_a_skewed_load():
    parallelism = Parallelism.from_config(
        mesh_config_from_dict(dict(ici="expert=4,fsdp=2", rules="fsdp_ep")))
    x, weights, indices, mask = _skewed_problem(seed=2)
    run = _expert_parallel(parallelism, ep.ExpertParallelOptions(0.0, "all_to_all"),
                           with_drops=True)
    got, dropped = parallelism.jit(run, None, None, compiler_options=QUICK_COMPILE)(
        x, weights, indices, mask, _problem()[4])
    want, kept, total = _dropping_reference(x, weights, indices, mask, _problem()[4], 8, T * B)
    assert kept == total and int(dropped) == 0
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


def test_dense_transport_keeps_the_ragged_all_to_all_contract():
    """The example of `jax.lax.ragged_all_to_all`'s docstring, through the dense stand-in."""
    mesh = jax.make_mesh((2,), ("x",), axis_types=(jax.sharding.AxisType.Auto,),
                         devices=jax.devices()[:2])
    args = [np.array(a, np.int32) for a in (
        [[1, 2, 2], [3, 4, 0]], [[0, 0, 0, 0]] * 2, [[0, 1], [0, 1]], [[1, 2], [1, 1]],
        [[0, 0], [1, 2]], [[1, 1], [2, 1]])]

    def body(*a):
        a = [v[0] for v in a]
        return ep.ragged_all_to_all_dense(*a, axis_name="x", num_shards=2)[None]

    out = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(P("x"),) * 6, out_specs=P("x")))(
        *args)
    np.testing.assert_array_equal(np.asarray(out), [[1, 3, 0, 0], [2, 2, 4, 0]])


def test_ragged_transport_is_in_the_program_and_its_gradient():
    """XLA:CPU cannot run ragged-all-to-all, so check the lowered accelerator program instead."""
    parallelism = Parallelism.from_config(
        mesh_config_from_dict(dict(ici="fsdp=2,expert=4", rules="fsdp_ep")))
    x, weights, indices, mask, w = _problem()
    run = _expert_parallel(parallelism, ep.ExpertParallelOptions(1.25, "ragged_all_to_all"))
    grad = jax.grad(lambda x, w: jnp.sum(run(x, weights, indices, mask, w) ** 2), argnums=(0, 1))
    text = parallelism.jit(grad, None, None).lower(x, w).as_text()
    # Forward: tokens out; backward: the transposes of both exchanges.
    assert text.count("ragged_all_to_all") >= 3


def test_moe_layer_hands_its_options_to_the_dispatch():
    """The layer's `expert_options` decide the receive buffer: dropless equals the dense layer,
    a small buffer drops copies."""
    parallelism = Parallelism.from_config(
        mesh_config_from_dict(dict(ici="expert=4,fsdp=2", rules="fsdp_ep")))
    x = jax.random.normal(jax.random.PRNGKey(3), (B, T, D))
    segment_ids = jnp.ones((B, T), jnp.int32)

    def layer(impl, capacity_factor=0.0):
        return MoE(E, K, F, 0.3, impl=impl,
                   expert_options=ep.ExpertParallelOptions(capacity_factor, "all_to_all"))

    params = layer("dense").init(jax.random.PRNGKey(4), x, segment_ids)
    dense = layer("dense").apply(params, x, segment_ids)[0]

    def expert_parallel(capacity_factor):
        return parallelism.jit(lambda p, x: layer("expert_parallel", capacity_factor).apply(
            p, x, segment_ids)[0], None, None, compiler_options=QUICK_COMPILE)(params, x)

    np.testing.assert_allclose(np.asarray(expert_parallel(0.0)), np.asarray(dense), rtol=1e-5,
                               atol=1e-5)
    assert np.abs(np.asarray(expert_parallel(0.25)) - np.asarray(dense)).max() > 1e-3


def test_model_runtime_reaches_the_expert_dispatch(monkeypatch):
    """`model.runtime.expert_capacity_factor` / `expert_transport` arrive at every MoE layer's
    dispatch (traced only)."""
    seen = []
    dispatch = ep.dispatch

    def spy(*args, options, **kwargs):
        seen.append(options)
        return dispatch(*args, options=options, **kwargs)

    monkeypatch.setattr(ep, "dispatch", spy)
    config = with_runtime(ph.parallel_model_config(), moe_impl="expert_parallel",
                          expert_capacity_factor=0.5, expert_transport="all_to_all")
    jax.eval_shape(lambda: init_params(MiMoV2Flash(config), jax.random.PRNGKey(0)))
    assert seen and set(seen) == {ep.ExpertParallelOptions(0.5, "all_to_all")}
