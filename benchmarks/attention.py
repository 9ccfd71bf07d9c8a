"""Sliding-window attention: dense masked vs chunked XLA (CPU), and the Pallas kernel (GPU/TPU).

    python -m benchmarks.attention                      # CPU: T in {2k, 8k, 16k}, dense vs chunked
    python -m benchmarks.attention --backend gpu        # on a GPU: Pallas (Triton) vs the XLA paths
    python -m benchmarks.attention --backend tpu        # on a TPU: Pallas (Mosaic) vs the XLA paths

Times forward and forward+backward (the vjp of all of q, k, v and the sinks) as the median of
`--repeats` runs after a compile-and-warm-up run (one run where a call takes over 20 s), at
batch 1 with the model's head geometry (q/k head dim 192, v head dim 128, GQA) and the
reference window W=129. The machine's load average is printed before and after: on a shared
machine, read the table with it.

FLOPs are counted the way MaxText counts sliding-window attention (`calculate_gemma2_tflops_...`):
forward = 2 * B * T * min(W, T) * N * (Hqk + Hv) / 2 (its causal halving, applied to the window
too), forward+backward = 3 * forward. A sliding window really computes about twice that
(each query sees W keys, not W/2), so TFLOP/s by this count are conservative.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from typing import Callable

import jax
import jax.numpy as jnp

from mimo_jax.ops import attention as attention_ops

# Dense bf16 matmul peaks (TFLOP/s per chip), by jax's device_kind.
PEAK_TFLOPS = {
    "TPU v4": 275.0, "TPU v5 lite": 197.0, "TPU v5e": 197.0, "TPU v5p": 459.0, "TPU v5": 459.0,
    "TPU v6 lite": 918.0, "TPU v6e": 918.0, "NVIDIA H100": 989.0, "NVIDIA H200": 989.0,
    "NVIDIA A100": 312.0, "NVIDIA B200": 2250.0,
}


def _load() -> str:
    try:
        return " ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "unknown"


def maxtext_flops(b: int, t: int, n: int, qk_dim: int, v_dim: int, window: int | None,
                  backward: bool) -> float:
    """Attention FLOPs as MaxText counts them (see the module docstring)."""
    keys = t if window is None else min(window, t)
    forward = 2 * b * t * keys * n * (qk_dim + v_dim) / 2
    return 3 * forward if backward else forward


def peak_tflops(device: jax.Device) -> float | None:
    kind = device.device_kind
    for name, peak in sorted(PEAK_TFLOPS.items(), key=lambda item: -len(item[0])):
        if kind.startswith(name):
            return peak
    return None


def time_call(fn: Callable, args, repeats: int, long_call_s: float = 20.0) -> float:
    """Median seconds of `fn(*args)` after one compile-and-warm-up call. A call slower than
    `long_call_s` (the dense path at long T on CPU) is timed once more, not `repeats` times."""
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    if time.perf_counter() - start > long_call_s:
        repeats = 1
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def make_fns(impl: str, window: int | None, chunk_size: int):
    """(forward, forward+backward) jitted for one implementation."""
    def attend(q, k, v, sinks):
        return attention_ops.attention(q, k, v, sinks=sinks, window=window, impl=impl,
                                       chunk_size=chunk_size)

    def forward_backward(q, k, v, sinks, cotangent):
        out, pullback = jax.vjp(attend, q, k, v, sinks)
        return out, pullback(cotangent)

    return jax.jit(attend), jax.jit(forward_backward)


def inputs(t: int, heads: int, kv_heads: int, qk_dim: int, v_dim: int, dtype):
    keys = jax.random.split(jax.random.PRNGKey(t), 5)
    q = jax.random.normal(keys[0], (1, t, heads, qk_dim), dtype)
    k = jax.random.normal(keys[1], (1, t, kv_heads, qk_dim), dtype)
    v = jax.random.normal(keys[2], (1, t, kv_heads, v_dim), dtype)
    sinks = jax.random.normal(keys[3], (heads,), jnp.float32)
    cotangent = jax.random.normal(keys[4], (1, t, heads, v_dim), dtype)
    return q, k, v, sinks, cotangent


def dense_bytes(t: int, heads: int) -> int:
    """Rough peak memory of the dense path's forward+backward: a few f32 [N, T, T] tensors."""
    return 5 * 4 * heads * t * t


def run(args) -> None:
    dtype = jnp.dtype(args.dtype)
    device = jax.devices()[0]
    impls = args.impls
    names = {"reference": "dense", "chunked": "chunked", "pallas": "pallas"}
    peak = peak_tflops(device)
    # CPU rates are far below a TFLOP/s.
    unit, scale = ("GFLOP/s", 1e9) if args.backend == "cpu" else ("TFLOP/s", 1e12)
    print(f"load average before: {_load()}")
    print(f"device: {device.device_kind} ({jax.default_backend()}), dtype {dtype.name}, "
          f"B=1 N={args.heads} K={args.kv_heads} Hqk={args.qk_dim} Hv={args.v_dim} "
          f"W={args.window} chunk={args.chunk_size}, median of {args.repeats}")
    header = ["T", "pass"] + [f"{names[i]} ms" for i in impls]
    header += [f"dense/{names[i]}" for i in impls if i != "reference" and "reference" in impls]
    header += [f"{names[i]} {unit}" for i in impls]
    if peak is not None:
        header += [f"{names[impls[0]]} % of {peak:.0f}"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for t in args.seq_lens:
        q, k, v, sinks, cotangent = inputs(t, args.heads, args.kv_heads, args.qk_dim, args.v_dim,
                                           dtype)
        for backward in (False, True):
            times = {}
            for impl in impls:
                if impl == "reference" and dense_bytes(t, args.heads) > args.dense_limit_gb * 2**30:
                    times[impl] = None  # would not fit: skipped, shown as "-"
                    continue
                forward, forward_backward = make_fns(impl, args.window, args.chunk_size)
                fn, fn_args = ((forward_backward, (q, k, v, sinks, cotangent)) if backward
                               else (forward, (q, k, v, sinks)))
                times[impl] = time_call(fn, fn_args, args.repeats)
            flops = maxtext_flops(1, t, args.heads, args.qk_dim, args.v_dim, args.window,
                                  backward)
            row = [str(t), "fwd+bwd" if backward else "fwd"]
            row += ["-" if times[i] is None else f"{1e3 * times[i]:.1f}" for i in impls]
            for impl in impls:
                if impl != "reference" and "reference" in impls:
                    ratio = (times["reference"] / times[impl]
                             if times.get("reference") and times[impl] else None)
                    row.append("-" if ratio is None else f"{ratio:.1f}x")
            row += ["-" if times[i] is None else f"{flops / times[i] / scale:.2f}" for i in impls]
            if peak is not None:
                first = times[impls[0]]
                row.append(f"{100 * flops / first / 1e12 / peak:.1f}%")
            print("| " + " | ".join(row) + " |", flush=True)
    print(f"load average after: {_load()}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=("cpu", "gpu", "tpu"), default="cpu")
    parser.add_argument("--seq-lens", type=lambda s: [int(x) for x in s.split(",")],
                        default=[2048, 8192, 16384])
    parser.add_argument("--heads", type=int, default=None,
                        help="query heads (default: 2 on CPU, 64 on GPU/TPU)")
    parser.add_argument("--kv-heads", type=int, default=None,
                        help="KV heads (default: 1 on CPU, 8 on GPU/TPU)")
    parser.add_argument("--qk-dim", type=int, default=192)
    parser.add_argument("--v-dim", type=int, default=128)
    parser.add_argument("--window", type=lambda s: None if s.lower() == "none" else int(s),
                        default=129, help="keys a query sees (129: SWA layers; none: GA layers)")
    parser.add_argument("--impls", type=lambda s: s.split(","), default=None,
                        help="comma-separated subset of reference,chunked,pallas (default: "
                             "reference,chunked on CPU; pallas,chunked,reference on GPU/TPU)")
    parser.add_argument("--chunk-size", type=int, default=128)
    parser.add_argument("--dtype", default=None, help="default: float32 on CPU, bfloat16 else")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dense-limit-gb", type=float, default=12.0,
                        help="skip the dense path where its tensors would exceed this")
    args = parser.parse_args()
    if args.backend != jax.default_backend():
        raise SystemExit(f"--backend {args.backend} but JAX's default backend is "
                         f"{jax.default_backend()!r}")
    on_cpu = args.backend == "cpu"
    args.heads = args.heads or (2 if on_cpu else 64)
    args.kv_heads = args.kv_heads or (1 if on_cpu else 8)
    args.dtype = args.dtype or ("float32" if on_cpu else "bfloat16")
    args.impls = args.impls or (["reference", "chunked"] if on_cpu
                                else ["pallas", "chunked", "reference"])
    bad = [impl for impl in args.impls if impl not in attention_ops.IMPLEMENTATIONS]
    if bad:
        raise SystemExit(f"--impls: unknown implementation {bad[0]!r}, not one of "
                         f"{tuple(attention_ops.IMPLEMENTATIONS)}")
    run(args)


if __name__ == "__main__":
    main()
