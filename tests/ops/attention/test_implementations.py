"""The shared test base of attention: every implementation in `ops.attention.IMPLEMENTATIONS`,
context parallelism over each of them and the KV-cache attention, held to the dense reference on
one set of cases; the reference itself held to a numpy loop.

The cases cover values and gradients (q, k, v, sinks), packed documents with padding (padding rows
exactly zero), sinks (random, and -inf against no sink), GQA ratios 1 to 16, windows
{1, 64, 129, T} and full causal, and lengths that are not a multiple of a block or chunk.
Kernel-specific checks (the GPU kernel family, block plans, lowering) are in test_pallas.py.

Inputs are fresh random draws each run (the seed is in every failure message); errors are measured
as max |actual - expected| / max |expected| per array.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from compile_options import QUICK_COMPILE
from mimo_jax.ops import attention as attention_ops
from mimo_jax.ops.attention import kv_cache
from mimo_jax.parallel import Parallelism, mesh_config_from_dict
from mimo_jax.parallel.rules import mesh_axes
from attention_inputs import check_case, random_inputs, relative_error

# The implementations held to the reference (the reference is held to numpy below).
FAST = [name for name in attention_ops.IMPLEMENTATIONS if name != "reference"]


def implementation(impl: str, window, chunk_size: int = 128, axes=None):
    """`attention` with everything but the arrays fixed: fn(q, k, v, sinks, segment_ids)."""
    def fn(q, k, v, sinks, segment_ids):
        return attention_ops.attention(q, k, v, sinks=sinks, window=window,
                                       segment_ids=segment_ids, impl=impl,
                                       chunk_size=chunk_size, mesh_axes=axes)
    return fn


# (T, N, K, H, V, window, segments, sink, chunk). Window 1 keeps a real sink: without one, dq and dk
# are exactly zero there and relative errors mean nothing.
CASES = [
    (300, 8, 1, 64, 32, 129, True, "random", 128),
    (200, 16, 1, 32, 16, 64, True, "-inf", 128),
    (160, 2, 2, 32, 16, 1, False, "random", 128),
    (160, 4, 1, 48, 32, "T", True, "random", 64),
    (200, 4, 2, 32, 16, None, True, "random", 64),
]


def _case_id(case) -> str:
    t, n, k, _, _, window, segments, sink, chunk = case
    return f"T{t}-G{n // k}-W{window}-{'seg' if segments else 'noseg'}-sink{sink}-C{chunk}"


@pytest.mark.parametrize("case", CASES, ids=_case_id)
@pytest.mark.parametrize("impl", FAST)
def test_float32_matches_reference(seed, impl, case):
    t, n, k, h, v, window, segments, sink, chunk = case
    window = t if window == "T" else window
    inputs = random_inputs(seed, 2, t, n, k, h, v, segments=segments)
    check_case(implementation(impl, window, chunk), implementation("reference", window), inputs,
               sink=sink, out_tol=1e-5, grad_tol=1e-4, seed=seed)


@pytest.mark.parametrize("impl", FAST)
def test_bfloat16_with_model_head_dims(seed, impl):
    """bf16 inputs, q/k head dim 192 and v head dim 128 as in the full model."""
    inputs = random_inputs(seed, 1, 256, 2, 1, 192, 128, dtype=jnp.bfloat16)
    check_case(implementation(impl, 129), implementation("reference", 129), inputs,
               sink="random", out_tol=2e-2, grad_tol=2e-2, seed=seed)


def test_reference_matches_a_numpy_loop(seed):
    """Row by row: softmax over the visible keys plus the sink column (which carries no value), in
    float64. The other implementations are held to the reference, so this pins the semantics of
    all: windows, documents, padding, GQA groups and sinks."""
    window = 5
    q, k, v, sinks, segment_ids, _ = random_inputs(seed, 2, 24, 4, 2, 8, 8)
    out = jax.jit(implementation("reference", window))(q, k, v, sinks, segment_ids)
    q, k, v, sinks, segments = (np.asarray(a, np.float64) for a in (q, k, v, sinks, segment_ids))
    want = np.zeros(out.shape)
    for b, i, n in np.ndindex(2, 24, 4):
        keys = [j for j in range(max(0, i - window + 1), i + 1)
                if segments[b, i] != 0 and segments[b, j] == segments[b, i]]
        if not keys:
            continue
        logits = np.array([q[b, i, n] @ k[b, j, n // 2] for j in keys]) / np.sqrt(8)
        weights = np.exp(logits) / (np.exp(logits).sum() + np.exp(sinks[n]))
        want[b, i, n] = weights @ v[b, keys, n // 2]
    assert relative_error(out, want) <= 1e-6, f"seed {seed}"


# Context parallelism: 2 rows of 32 with five documents and padding in row 0, borders inside and
# on shard edges (shards of 8).
CONTEXT_SEGMENTS = jnp.asarray([[1] * 5 + [2] * 14 + [3] * 5 + [4] * 5 + [0] * 3, [1] * 32],
                               jnp.int32)


@pytest.mark.parametrize("ici, preset, window, sink, impl", [
    # 4 shards of 8: the 12-key window reaches two shards back (two ppermute hops).
    ("context=4,fsdp=2", "fsdp_cp", 12, "random", "chunked"),
    ("context=4,fsdp=2", "fsdp_cp", 12, "random", "pallas"),
    # One hop; query heads split over tensor while the 2 KV heads stay whole.
    ("context=4,tensor=2", "fsdp_tp_ep_cp", 5, "random", "chunked"),
    # Global causal layer: K/V all-gathered; chunks over all keys at the shard's offset.
    ("context=4,fsdp=2", "fsdp_cp", None, "-inf", "chunked"),
    # Global causal layer with the flash kernel: each shard's own block causally, the earlier
    # shards' blocks in full, the later ones skipped, merged by log-sum-exp; with a sink too.
    ("context=4,fsdp=2", "fsdp_cp", None, "-inf", "pallas"),
    ("context=2,tensor=2,fsdp=2", "fsdp_tp_ep_cp", None, "random", "pallas"),
])
def test_context_parallel_matches_reference(seed, ici, preset, window, sink, impl):
    parallelism = Parallelism.from_config(mesh_config_from_dict(dict(ici=ici, rules=preset)))
    axes = (mesh_axes(("batch", "length", "heads", "head_dim"), parallelism.rules),
            mesh_axes(("batch", "length", "kv_heads", "head_dim"), parallelism.rules))
    q, k, v, sinks, _, cotangent = random_inputs(seed, 2, 32, 4, 2, 8, 6)
    inputs = (q, k, v, sinks, CONTEXT_SEGMENTS, cotangent)
    check_case(implementation(impl, window, chunk_size=4, axes=axes),
               implementation("reference", window), inputs, sink=sink, out_tol=1e-5,
               grad_tol=1e-5, seed=seed,
               jit=lambda fn: parallelism.jit(fn, None, None, compiler_options=QUICK_COMPILE))


@pytest.mark.parametrize("window", [6, None])
def test_kv_cache_attention_in_chunks_matches_reference(seed, window):
    """A sequence fed through `kv_cache.attend` in chunks of 9 tokens and of 1 (a ring of W + 2
    slots, which the 9-token chunks overflow; a full-length cache without a window) gives the
    reference's rows. Row 1 ends 4 tokens early: its padding (position -1) returns zeros."""
    b, t, num_kv, h, v_dim = 2, 30, 2, 16, 8
    q, k, v, sinks, _, _ = random_inputs(seed, b, t, 4, num_kv, h, v_dim, segments=False)
    slots = t if window is None else window + 2
    cache = kv_cache.LayerCache(keys=jnp.zeros((b, num_kv, slots, h)),
                                values=jnp.zeros((b, num_kv, v_dim, slots)),
                                positions=jnp.full((b, slots), -1, jnp.int32))
    positions = np.broadcast_to(np.arange(t, dtype=np.int32), (b, t)).copy()
    positions[1, t - 4:] = -1
    attend = jax.jit(kv_cache.attend, static_argnames="window")
    outputs, start = [], 0
    for size in (9, 1, 9, 1, 9, 1):
        chunk = slice(start, start + size)
        out, cache = attend(cache, q[:, chunk], k[:, chunk], v[:, chunk],
                            jnp.asarray(positions[:, chunk]), window=window, sinks=sinks)
        outputs.append(out)
        start += size
    got = np.asarray(jnp.concatenate(outputs, axis=1))
    want = jax.jit(implementation("reference", window))(
        q, k, v, sinks, jnp.asarray(positions >= 0, jnp.int32))
    assert relative_error(got, want) <= 1e-5, f"seed {seed}"
    np.testing.assert_array_equal(got[1, t - 4:], 0.0)


def test_chunked_full_causal_backward_memory_is_linear_in_length():
    """The chunked path's full-causal backward keeps one chunk's [C, T] probabilities at a time:
    doubling T roughly doubles the compiled program's temporary memory (O(T * C)), and at
    T = 2048 it stays far below the [T, T] probabilities a non-rematerialised pass keeps."""
    def temp_bytes(t: int) -> int:
        q = jax.ShapeDtypeStruct((1, t, 2, 16), jnp.float32)
        kv = jax.ShapeDtypeStruct((1, t, 1, 16), jnp.float32)
        grad = jax.grad(lambda q, k, v: attention_ops.chunked_attention(
            q, k, v, chunk_size=64).sum(), argnums=(0, 1, 2))
        return jax.jit(grad).lower(q, kv, kv).compile().memory_analysis().temp_size_in_bytes

    small, large = temp_bytes(1024), temp_bytes(2048)
    assert large <= 2.2 * small, (small, large)
    probabilities = 2 * 2048 * 2048 * 4  # heads x T x T float32
    assert large <= probabilities / 4, (large, probabilities)
