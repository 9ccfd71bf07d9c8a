"""What is particular to the Pallas flash-attention kernels: the GPU kernel family and explicit
block lengths held to the dense reference (run by the Pallas interpreter on CPU; the registry's
"pallas", the TPU family on CPU, goes through the shared cases of test_implementations.py), the
block plan held to brute force, and both families lowered for their real targets with jax.export
(lowering only: nothing runs on TPU or GPU here).

Inputs are fresh random draws each run (the seed is in every failure message); errors are measured
as max |actual - expected| / max |expected| per array.
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mimo_jax.ops import attention as attention_ops
from mimo_jax.ops.attention import pallas
from mimo_jax.ops.attention.pallas_common import BlockPlan
from attention_inputs import check_case, random_inputs

BACKENDS = ("tpu", "gpu")


def flash(backend: str, window, **blocks):
    def fn(q, k, v, sinks, segment_ids):
        return pallas.flash_attention(q, k, v, sinks=sinks, window=window,
                                          segment_ids=segment_ids, backend=backend,
                                          interpret=True, **blocks)
    return fn


def reference(window):
    def fn(q, k, v, sinks, segment_ids):
        return attention_ops.reference_attention(q, k, v, sinks=sinks, window=window,
                                                 segment_ids=segment_ids)
    return fn


# (T, N, K, H, V, window, segments, sink, blocks) per kernel family, beyond the shared cases (which
# run the TPU family with its default blocks). GPU: windows {1, 64, 128, 129} and full causal, T
# never a multiple of a block, GQA ratios 1 to 16, packed segments with padding (and padding without
# segments), sinks of -inf against no sink, query and key blocks of different lengths. (Window 1
# keeps a real sink: without one, dq and dk are exactly zero there and relative errors mean
# nothing.)
CASES = {
    "tpu": [
        (260, 4, 2, 32, 32, 128, True, "-inf", dict(block_q=256, block_k=128)),
    ],
    "gpu": [
        (300, 8, 1, 64, 32, 129, True, "random", {}),
        (200, 16, 1, 32, 16, 64, True, "-inf", {}),
        (160, 2, 2, 32, 16, 1, False, "random", {}),
        (260, 4, 2, 32, 32, 128, True, "random", dict(block_q=32, block_k=16)),
        (300, 4, 2, 32, 16, None, True, "random", {}),
    ],
}


def _case_id(case) -> str:
    t, n, k, _, _, window, segments, sink, blocks = case
    blocks = "-".join(f"{v}" for v in blocks.values())
    return f"T{t}-G{n // k}-W{window}-{'seg' if segments else 'noseg'}-sink{sink}-{blocks}"


@pytest.mark.parametrize("backend, case", [(b, c) for b in BACKENDS for c in CASES[b]],
                         ids=lambda x: x if isinstance(x, str) else _case_id(x))
def test_float32_matches_reference(seed, backend, case):
    t, n, k, h, v, window, segments, sink, blocks = case
    window = t if window == "T" else window
    inputs = random_inputs(seed, 2, t, n, k, h, v, segments=segments)
    check_case(flash(backend, window, **blocks), reference(window), inputs, sink=sink, out_tol=1e-5,
               grad_tol=1e-4, seed=seed)


def test_gpu_bfloat16_with_model_head_dims(seed):
    """bf16 inputs, q/k head dim 192 and v head dim 128 (the GPU family splits 128 + 64; the TPU
    family's padding runs in the shared cases)."""
    inputs = random_inputs(seed, 1, 256, 2, 1, 192, 128, dtype=jnp.bfloat16)
    check_case(flash("gpu", 129), reference(129), inputs, sink="random", out_tol=2e-2,
               grad_tol=2e-2, seed=seed)


@pytest.mark.parametrize("t, bq, bk, window", [
    (300, 128, 128, 129), (300, 128, 128, 1), (1000, 256, 128, 200), (520, 64, 16, 50),
    (777, 32, 64, None), (128, 128, 128, 64)])
def test_block_plan_visits_exactly_the_needed_blocks(t, bq, bk, window):
    """kv_range/q_range hold exactly the tiles with a visible pair: O(T * W), nothing missed."""
    plan = BlockPlan.make(t, bq, bk, window)
    q_pos = np.arange(plan.padded_len)[:, None]
    k_pos = np.arange(plan.padded_len)[None, :]
    visible = (k_pos <= q_pos) & (q_pos < t)  # padding queries and keys (>= T) need nothing
    if window is not None:
        visible &= k_pos > q_pos - window
    needed = visible.reshape(plan.num_q_blocks, bq, plan.num_k_blocks, bk).any(axis=(1, 3))
    by_query = np.zeros_like(needed)
    for i in range(plan.num_q_blocks):
        lo, hi = plan.kv_range(i)
        by_query[i, lo:hi + 1] = True
        assert hi - lo + 1 <= plan.kv_steps
    by_key = np.zeros_like(needed)
    for j in range(plan.num_k_blocks):
        lo, hi = plan.q_range(j)
        by_key[lo:hi + 1, j] = True
        assert hi - lo + 1 <= plan.q_steps
    np.testing.assert_array_equal(by_query, needed)
    np.testing.assert_array_equal(by_key, needed)
    if window is not None:
        assert plan.kv_steps <= -(-(bq + window - 1) // bk) + 1


@pytest.mark.parametrize("kwargs, message", [
    (dict(backend="cuda"), "backend 'cuda'"),
    (dict(backend="tpu", block_q=64), "multiple of 128"),
    (dict(backend="tpu", block_q=384, block_k=256), "must divide"),
    (dict(backend="gpu", block_k=48), "power of two"),
    (dict(window=0), "window must be >= 1"),
    (dict(sinks=jnp.zeros(2)), "sinks must have shape"),
])
def test_bad_arguments_raise(kwargs, message):
    q = jnp.ones((1, 300, 4, 16))
    k = v = jnp.ones((1, 300, 2, 16))
    with pytest.raises(ValueError, match=message):
        pallas.flash_attention(q, k, v, **kwargs)


# The Triton custom call has no cross-version compatibility guarantee, so jax.export must be told
# that this is expected; the Mosaic (TPU) custom call has one.
EXPORT_CHECKS = {"tpu": (), "gpu": (jax.export.DisabledSafetyCheck.custom_call(
    "__gpu$xla.gpu.triton"),)}
EXPORT_PLATFORM = {"tpu": "tpu", "gpu": "cuda"}
KERNEL_CALL = {"tpu": "tpu_custom_call", "gpu": "__gpu$xla.gpu.triton"}


@pytest.mark.parametrize("backend, window", list(itertools.product(BACKENDS, [129, None])))
def test_export_lowers_for_the_real_target(backend, window):
    """Forward and gradient lower for TPU (Mosaic) / CUDA (Triton) at the model's shapes."""
    b, t, n, k, h, v = 1, 2048, 16, 2, 192, 128
    shapes = [jax.ShapeDtypeStruct(s, jnp.bfloat16) for s in ((b, t, n, h), (b, t, k, h),
                                                              (b, t, k, v))]
    shapes += [jax.ShapeDtypeStruct((n,), jnp.float32), jax.ShapeDtypeStruct((b, t), jnp.int32)]

    def forward(q_, k_, v_, sinks, segment_ids):
        return pallas.flash_attention(q_, k_, v_, sinks=sinks, window=window,
                                          segment_ids=segment_ids, backend=backend,
                                          interpret=False)

    def gradient(q_, k_, v_, sinks, segment_ids):
        loss = lambda *args: jnp.sum(forward(*args, segment_ids).astype(jnp.float32))  # noqa: E731
        return jax.grad(loss, argnums=(0, 1, 2, 3))(q_, k_, v_, sinks)

    for fn, calls in ((forward, 1), (gradient, 3)):
        exported = jax.export.export(jax.jit(fn), platforms=(EXPORT_PLATFORM[backend],),
                                     disabled_checks=EXPORT_CHECKS[backend])(*shapes)
        assert exported.platforms == (EXPORT_PLATFORM[backend],)
        assert exported.mlir_module().count(KERNEL_CALL[backend]) >= calls
