"""Context-parallel attention (`ops/context_parallel.py`) against the dense reference, values and
gradients, with packed documents and padding crossing shard borders; and the MTP shift on a
sequence split over the context axis."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import parallel_helpers as ph
from mimo_jax.model.mtp import shift_left
from mimo_jax.ops import attention as attention_ops
from mimo_jax.parallel import Parallelism, mesh_config_from_dict
from mimo_jax.parallel.rules import mesh_axes

B, T, N, K, H, V = 2, 32, 4, 2, 8, 6
# Row 0: five documents and padding, borders inside and on shard edges (shards of 8 or 4).
SEGMENTS = np.array([[1] * 5 + [2] * 14 + [3] * 5 + [4] * 5 + [0] * 3, [1] * 32], np.int32)


def _inputs():
    keys = jax.random.split(jax.random.PRNGKey(0), 5)
    return (jax.random.normal(keys[0], (B, T, N, H)), jax.random.normal(keys[1], (B, T, K, H)),
            jax.random.normal(keys[2], (B, T, K, V)), jax.random.normal(keys[3], (N,)),
            jax.random.normal(keys[4], (B, T, N, V)))


@pytest.mark.parametrize("ici, preset, window, with_sink", [
    # 4 shards of 8: the 12-key window reaches two shards back (two ppermute hops).
    ("context=4,fsdp=2", "fsdp_cp", 12, True),
    # 4 shards of 8, one hop; query heads split over tensor while the 2 KV heads stay whole.
    ("context=4,tensor=2", "fsdp_tp_ep_cp", 5, True),
    # Global causal layer: K/V all-gathered.
    ("context=4,fsdp=2", "fsdp_cp", None, False),
])
def test_context_parallel_attention_matches_reference(ici, preset, window, with_sink):
    parallelism = Parallelism.from_config(mesh_config_from_dict(dict(ici=ici, rules=preset)))
    q, k, v, sinks, probe = _inputs()
    sinks = sinks if with_sink else None
    layouts = (mesh_axes(("batch", "length", "heads", "head_dim"), parallelism.rules),
               mesh_axes(("batch", "length", "kv_heads", "head_dim"), parallelism.rules))
    real = jnp.asarray(SEGMENTS > 0)[..., None, None]

    def loss(fn, *args):
        return jnp.sum(jnp.where(real, fn(*args) * probe, 0.0))

    def sharded(q, k, v, sinks):
        return attention_ops.attention(q, k, v, sinks=sinks, window=window,
                                       segment_ids=SEGMENTS, impl="chunked", chunk_size=4,
                                       mesh_axes=layouts)

    def reference(q, k, v, sinks):
        return attention_ops.reference_attention(q, k, v, sinks=sinks, window=window,
                                                 segment_ids=SEGMENTS)

    argnums = (0, 1, 2, 3) if with_sink else (0, 1, 2)
    step = parallelism.jit(
        lambda *a: (sharded(*a), jax.grad(lambda *b: loss(sharded, *b), argnums)(*a)),
        None, None, compiler_options=ph.QUICK_COMPILE)
    got, got_grads = step(q, k, v, sinks)
    want, want_grads = jax.jit(
        lambda *a: (reference(*a), jax.grad(lambda *b: loss(reference, *b), argnums)(*a)),
        compiler_options=ph.QUICK_COMPILE)(q, k, v, sinks)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
    assert ph.max_relative_error(got_grads, want_grads) < 1e-5


def test_mtp_shift_crosses_context_shard_borders():
    parallelism = Parallelism.from_config(
        mesh_config_from_dict(dict(ici="context=8", rules="fsdp_cp")))
    tokens = np.random.default_rng(0).integers(1, 100, (B, T)).astype(np.int32)
    sharding = parallelism.batch_shardings({"x": tokens})["x"]
    assert sharding.shard_shape(tokens.shape) == (B, 4)

    def shifts(tokens, segments):
        return [shift_left(tokens, segments, s) for s in (1, 2, 3, 5)]

    got = parallelism.jit(shifts, (sharding, sharding), None)(tokens, SEGMENTS)
    want = shifts(jnp.asarray(tokens), jnp.asarray(SEGMENTS))
    for (g, g_valid), (w, w_valid) in zip(got, want):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w))
        np.testing.assert_array_equal(np.asarray(g_valid), np.asarray(w_valid))
    # A target really comes from the next shard: position 3 (shard 0) -> 4 (shard 1) in row 1.
    assert int(got[0][0][1, 3]) == tokens[1, 4]
