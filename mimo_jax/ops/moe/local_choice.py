"""Which one-device MoE dispatch is fastest on a backend: the rule behind `moe_impl="auto"`.

  cpu       "blocked": the routed copies in expert blocks, one dense GEMM per block. Measured
            (`benchmarks/moe_dispatch.py`, 4096 tokens, D = F = 256): 1.8-2.1x the dense twin's
            forward and 2.7-4.1x its forward + backward, where XLA:CPU's `ragged_dot` runs at
            0.15-0.38x the dense twin.
  tpu, gpu  "ragged": `ragged_dot` is XLA:TPU's grouped matmul, and unlike the blocked
            dispatch's accelerator formulation it makes no [J, D, F] per-block copy of the expert
            weights, which at the full model's sizes would take gigabytes. Not yet timed on an
            accelerator (`benchmarks/moe_dispatch.py --backend` is the check to run); on GPU in
            particular the blocked dispatch may win, and this table is where to say so.
Whatever the choice, `api.dispatch` still hands calls with fewer token copies than experts
(decoding at small batch) to "gathered".
"""

from __future__ import annotations

import jax

FASTEST_ONE_DEVICE = {"cpu": "blocked", "tpu": "ragged", "gpu": "ragged"}


def fastest_one_device_impl(backend: str | None = None) -> str:
    """The one-device dispatch `auto` runs on `backend` (default: JAX's default backend)."""
    backend = jax.default_backend() if backend is None else backend
    return FASTEST_ONE_DEVICE.get(backend, "blocked")
