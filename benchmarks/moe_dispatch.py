r"""MoE dispatch speed: dense twin vs ragged vs blocked, forward and forward + backward.

    python benchmarks/moe_dispatch.py                       # 4096 tokens, D = F = 256, E16k4, E32k8
    python benchmarks/moe_dispatch.py --impls dense,blocked --repeats 9 --shapes 16x4

For each shape (E experts x k chosen) every implementation is compiled first, then the measures
alternate (each implementation's forward, then its forward + backward, in turn) for `--repeats`
rounds, and the table shows the median milliseconds: forward, forward + backward (the gradient
of a random projection of the output with respect to x, the gate weights and the three expert
weights), their ratio, and the speed-up over the dense twin. The last column is the largest
difference from the dense output, a check that every implementation computed the same thing.
"""

from __future__ import annotations

import argparse
import functools
import pathlib
import statistics
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # noqa: E402  (after the repository is on the path)
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from mimo_jax.ops import moe  # noqa: E402
from mimo_jax.ops.moe import blocked as moe_blocked  # noqa: E402


def _inputs(tokens: int, dim: int, ffn: int, experts: int, top_k: int) -> tuple:
    """Random tokens, routing and expert weights (fixed seed); the routing is the model's own."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(tokens, dim)), jnp.float32)
    logits = jnp.asarray(rng.normal(size=(tokens, experts)), jnp.float32)
    weights, indices, _ = moe.route(logits, jnp.zeros((experts,), jnp.float32), top_k)
    scale = dim ** -0.5
    experts_weights = tuple(
        jnp.asarray(rng.normal(scale=scale, size=shape), jnp.float32)
        for shape in ((experts, dim, ffn), (experts, dim, ffn), (experts, ffn, dim)))
    projection = jnp.asarray(rng.normal(size=(tokens, dim)), jnp.float32)
    return x, weights, indices, experts_weights, projection


def _programs(dispatch, projection) -> tuple:
    """(forward, forward + backward) jitted; routing indices are arguments, not constants."""
    forward = jax.jit(lambda x, w, i, ws: dispatch(x, w, i, *ws))

    def loss(x, w, i, ws):
        return jnp.sum(dispatch(x, w, i, *ws) * projection)

    backward = jax.jit(jax.grad(loss, argnums=(0, 1, 3)))
    return forward, backward


def _timed(jax, fn, args) -> float:
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    return time.perf_counter() - start


def shape_rows(impls: list[str], tokens: int, dim: int, ffn: int, experts: int, top_k: int,
               repeats: int) -> list[str]:
    """Markdown rows for one shape, one row per implementation."""


    dispatches = {"dense": moe.dense_dispatch, "ragged": moe.ragged_dispatch,
                  "blocked": moe_blocked.blocked_dispatch,
                  "blocked-loop": functools.partial(moe_blocked.blocked_dispatch,
                                                    formulation="loop"),
                  "blocked-batched": functools.partial(moe_blocked.blocked_dispatch,
                                                       formulation="batched")}
    x, weights, indices, experts_weights, projection = _inputs(tokens, dim, ffn, experts, top_k)
    args = (x, weights, indices, experts_weights)
    programs = {name: _programs(dispatches[name], projection) for name in impls}
    outputs = {name: np.asarray(fwd(*args)) for name, (fwd, _) in programs.items()}
    for _, bwd in programs.values():
        jax.block_until_ready(bwd(*args))  # compiles
    times = {name: ([], []) for name in impls}
    for _ in range(repeats):
        for name, (fwd, bwd) in programs.items():
            times[name][0].append(_timed(jax, fwd, args))
            times[name][1].append(_timed(jax, bwd, args))
    medians = {name: (statistics.median(f), statistics.median(b))
               for name, (f, b) in times.items()}
    base = medians.get("dense")
    reference = outputs.get("dense")
    block = moe_blocked.default_block_rows(tokens * top_k, experts)
    rows = []
    for name in impls:
        fwd, both = medians[name]
        speedup = (f"{base[0] / fwd:.2f}x / {base[1] / both:.2f}x" if base else "-")
        error = (f"{np.max(np.abs(outputs[name] - reference)):.1e}"
                 if reference is not None else "-")
        label = f"{name} (I={block})" if name.startswith("blocked") else name
        rows.append(f"| E={experts} k={top_k} | {label} | {fwd * 1e3:.1f} | {both * 1e3:.1f} | "
                    f"{both / fwd:.2f} | {speedup} | {error} |")
    return rows


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=8 * 512, help="T: batch x length")
    parser.add_argument("--dim", type=int, default=256, help="D: model dim")
    parser.add_argument("--ffn", type=int, default=256, help="F: expert ffn dim")
    parser.add_argument("--shapes", default="16x4,32x8", help="comma-separated ExK pairs")
    parser.add_argument("--impls", default="dense,ragged,blocked",
                        help="from dense, ragged, blocked, blocked-loop, blocked-batched")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--backend", default="cpu", choices=("cpu", "gpu", "tpu"))
    args = parser.parse_args(argv)
    jax.config.update("jax_platforms", args.backend)
    impls = args.impls.split(",")
    known = ("dense", "ragged", "blocked", "blocked-loop", "blocked-batched")
    unknown = [name for name in impls if name not in known]
    if unknown:
        parser.error(f"--impls: unknown {unknown}; choose from {known}")
    shapes = []
    for pair in args.shapes.split(","):
        experts, _, top_k = pair.partition("x")
        if not (experts.isdigit() and top_k.isdigit()) or not 1 <= int(top_k) <= int(experts):
            parser.error(f"--shapes: {pair!r} is not ExK with 1 <= K <= E")
        shapes.append((int(experts), int(top_k)))


    print(f"T={args.tokens} D={args.dim} F={args.ffn}, float32, backend "
          f"{jax.default_backend()} ({jax.devices()[0].device_kind}), median of {args.repeats}")
    print("| shape | dispatch | fwd ms | fwd+bwd ms | (fwd+bwd) / fwd | speed-up vs dense "
          "(fwd / fwd+bwd) | max abs diff vs dense |")
    print("|---|---|---|---|---|---|---|")
    for experts, top_k in shapes:
        for row in shape_rows(impls, args.tokens, args.dim, args.ffn, experts, top_k,
                              args.repeats):
            print(row, flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
