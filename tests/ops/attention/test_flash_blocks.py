"""`pallas.flash_attention_with_lse`, the kernel context parallelism runs per block of keys: a
non-causal block with its own key segments, and the row log-sum-exps, values and gradients
(through the lse too), on both kernel families (interpreted), and lowered for TPU and CUDA."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attention_inputs import random_inputs
from mimo_jax.ops.attention import pallas
from mimo_jax.ops.attention.pallas_common import EMPTY_ROW_LSE

B, T, N, K, H, U = 2, 24, 4, 2, 8, 6
# As in test_pallas.py: the Triton custom call has no cross-version compatibility guarantee.
EXPORT_CHECKS = {"tpu": (), "gpu": (jax.export.DisabledSafetyCheck.custom_call(
    "__gpu$xla.gpu.triton"),)}
EXPORT_PLATFORM = {"tpu": "tpu", "gpu": "cuda"}
KERNEL_CALL = {"tpu": "tpu_custom_call", "gpu": "__gpu$xla.gpu.triton"}


def _plain(q, k, v, q_seg, k_seg, sinks, causal):
    """The same in jnp: [B, T, N, U] and [B, N, T] (a row that sees nothing: 0 and
    EMPTY_ROW_LSE)."""
    group = N // K
    k, v = jnp.repeat(k, group, axis=2), jnp.repeat(v, group, axis=2)
    logits = jnp.einsum("bqnh,bknh->bnqk", q, k, precision="highest") * H ** -0.5
    visible = (q_seg[:, :, None] == k_seg[:, None, :]) & (q_seg != 0)[:, :, None]
    if causal:
        visible = visible & (jnp.arange(T)[None, :] <= jnp.arange(T)[:, None])[None]
    visible = visible[:, None]
    masked = jnp.where(visible, logits, -jnp.inf)
    if sinks is not None:
        sink = jnp.broadcast_to(sinks[None, :, None, None], masked.shape[:-1] + (1,))
        masked = jnp.concatenate([masked, sink], axis=-1)
    lse = jax.nn.logsumexp(masked, axis=-1)
    seen = jnp.isfinite(lse)
    weights = jnp.where(seen[..., None], jnp.exp(masked - jnp.where(seen, lse, 0)[..., None]), 0)
    out = jnp.einsum("bnqk,bknu->bqnu", weights[..., :T], v, precision="highest")
    return out, jnp.where(seen, lse, EMPTY_ROW_LSE)


@pytest.mark.parametrize("backend", ["tpu", "gpu"])
@pytest.mark.parametrize("causal", [False, True], ids=["earlier_block", "own_block"])
def test_block_kernel_matches_plain_attention(backend, causal):
    q, k, v, sinks, q_seg, cotangent = random_inputs(3, B, T, N, K, H, U)
    rng = np.random.default_rng(4)
    # Another block's keys: other documents, some shared with the queries (ids 1-3), padding.
    k_seg = jnp.asarray(np.sort(rng.integers(0, 4, (B, T)), axis=1)[:, ::-1].copy(), jnp.int32)
    k_seg = q_seg if causal else k_seg
    sinks = sinks if causal else None
    lse_cotangent = jnp.asarray(rng.standard_normal((B, N, T)), jnp.float32)

    def loss(fn, q, k, v):
        out, lse = fn(q, k, v)
        real = lse > EMPTY_ROW_LSE / 2  # rows that see something; the others' lse is a marker
        return jnp.sum(out * cotangent) + jnp.sum(jnp.where(real, lse, 0.0) * lse_cotangent)

    def kernel(q, k, v):
        return pallas.flash_attention_with_lse(
            q, k, v, sinks=sinks, segment_ids=q_seg, kv_segment_ids=k_seg, causal=causal,
            backend=backend, **({"block_q": 16, "block_k": 16} if backend == "gpu" else {}))

    def plain(q, k, v):
        return _plain(q, k, v, q_seg, k_seg, sinks, causal)

    (out, lse), (want_out, want_lse) = jax.jit(kernel)(q, k, v), plain(q, k, v)
    np.testing.assert_allclose(out, want_out, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(lse, want_lse, atol=1e-5, rtol=1e-5)
    if sinks is None:
        assert bool(jnp.any(lse == EMPTY_ROW_LSE))  # padding rows see nothing (no sink)
    grads = jax.jit(jax.grad(lambda *a: loss(kernel, *a), argnums=(0, 1, 2)))(q, k, v)
    want = jax.grad(lambda *a: loss(plain, *a), argnums=(0, 1, 2))(q, k, v)
    for got, expected in zip(grads, want):
        np.testing.assert_allclose(got, expected, atol=2e-5, rtol=1e-5)


def test_a_non_causal_block_has_no_window():
    q, k, v, _, segments, _ = random_inputs(0, 1, 8, 2, 1, 8, 8)
    with pytest.raises(ValueError, match="non-causal call has no window"):
        pallas.flash_attention_with_lse(q, k, v, window=4, causal=False, segment_ids=segments)


@pytest.mark.parametrize("backend", ["tpu", "gpu"])
def test_block_kernel_lowers_for_the_real_target(backend):
    """A non-causal block with its own key segments, forward and gradient, lowers for TPU
    (Mosaic) / CUDA (Triton) at the global layers' head shapes."""
    b, t, n, k, h, u = 1, 1024, 16, 1, 192, 128
    shapes = [jax.ShapeDtypeStruct(s, jnp.bfloat16) for s in ((b, t, n, h), (b, t, k, h),
                                                              (b, t, k, u))]
    shapes += [jax.ShapeDtypeStruct((b, t), jnp.int32)] * 2

    def loss(q, k_, v, q_seg, k_seg):
        out, lse = pallas.flash_attention_with_lse(
            q, k_, v, segment_ids=q_seg, kv_segment_ids=k_seg, causal=False, backend=backend,
            interpret=False)
        return jnp.sum(out.astype(jnp.float32)) + jnp.sum(lse)

    gradient = jax.grad(loss, argnums=(0, 1, 2))
    exported = jax.export.export(jax.jit(gradient), platforms=(EXPORT_PLATFORM[backend],),
                                 disabled_checks=EXPORT_CHECKS[backend])(*shapes)
    assert exported.mlir_module().count(KERNEL_CALL[backend]) >= 3
