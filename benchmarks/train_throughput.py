r"""Train-step throughput: tokens/s and model FLOPs utilisation (MFU).

    python benchmarks/train_throughput.py --config configs/tiny.py
    python benchmarks/train_throughput.py --config configs/tiny.py --backend gpu \
        --config.data.batch_size=64 --config.data.seq_len=2048 --config.model.runtime.dtype=bfloat16

Times the jitted train step (the trainer's own: forward, backward, AdamW, router-bias update)
on random full rows after warm-up, and prints one markdown table. Model FLOPs come from
`mimo_jax.train.flops` (sliding-window layers counted over the keys they really attend, k routed
experts per token, MTP heads included, training = 3 x forward); XLA's own count of the compiled
step is printed beside it, and is larger wherever the implementation does extra work (a dense MoE
dispatch runs every expert on every token; masked attention blocks). MFU divides model FLOP/s by
the device's peak: the vendor's dense bf16 figure for known accelerators, and on CPU the rate
this machine reaches on a large float32 matmul (measured here, printed).
"""

from __future__ import annotations

import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from ml_collections import config_flags

# Run as a script from anywhere: the package and configs/ live one directory up.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from mimo_jax.train import partition  # noqa: E402  (needs the line above)
from mimo_jax.train.flops import flops_per_token  # noqa: E402
from mimo_jax.train.trainer import build_configs, step_program  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", "configs/tiny.py", "Run config.")
_BACKEND = flags.DEFINE_enum("backend", "cpu", ["cpu", "gpu", "tpu"], "JAX platform to use.")
_STEPS = flags.DEFINE_integer("steps", 5, "Timed steps (after warm-up).")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed steps (the first one compiles).")
_PEAK = flags.DEFINE_float("peak_tflops", 0.0, "Peak TFLOP/s per device (0 = known table / "
                           "measured matmul on CPU).")

# Dense bf16 peak TFLOP/s per chip (vendor figures, without sparsity).
PEAK_TFLOPS = {
    "NVIDIA H200": 989.0, "NVIDIA H100": 989.0, "NVIDIA A100": 312.0, "NVIDIA L4": 121.0,
    "TPU v4": 275.0, "TPU v5 lite": 197.0, "TPU v5e": 197.0, "TPU v5p": 459.0, "TPU v5": 459.0,
    "TPU v6 lite": 918.0, "TPU v6e": 918.0,
}


def _peak_from_table(kind: str) -> float | None:
    for name, tflops in sorted(PEAK_TFLOPS.items(), key=lambda kv: -len(kv[0])):
        if kind.startswith(name):
            return tflops
    return None


def _measured_matmul_tflops() -> float:
    """float32 matmul rate of the default device: the CPU's practical peak."""
    n = 2048
    a = jnp.ones((n, n), jnp.float32)
    matmul = jax.jit(lambda x: x @ x)
    matmul(a).block_until_ready()
    runs = 5
    start = time.perf_counter()
    for _ in range(runs):
        out = matmul(a)
    out.block_until_ready()
    return 2 * n ** 3 * runs / (time.perf_counter() - start) / 1e12


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    # Before the first computation, which is when JAX starts its backends.
    jax.config.update("jax_platforms", _BACKEND.value)
    configs = build_configs(_CONFIG.value)
    model_cfg, data_cfg, train_cfg = configs.model, configs.data, configs.train
    batch, seq = data_cfg.batch_size, data_cfg.seq_len
    parallelism = partition.make_parallelism(configs.mesh, train_cfg.num_devices)
    mesh = parallelism.mesh
    partition.check_batch(batch, seq, train_cfg.grad_accum_steps, parallelism)
    program = step_program(configs, parallelism, seed=0)  # the trainer's own jitted step
    state, step = program.initial_state(seed=0), program.train_step
    rng = np.random.default_rng(0)
    host_batch = {"tokens": rng.integers(0, model_cfg.vocab_size, (batch, seq)).astype(np.int32),
                  "segment_ids": np.ones((batch, seq), np.int32),
                  "positions": np.tile(np.arange(seq, dtype=np.int32), (batch, 1))}
    device_batch = program.global_batch(host_batch, parallelism)
    learning_rate = np.float32(train_cfg.learning_rate)

    compile_start = time.perf_counter()
    compiled = step.lower(state, device_batch, learning_rate).compile()  # for XLA's FLOP count
    compile_seconds = time.perf_counter() - compile_start
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    xla_flops = float((cost or {}).get("flops", float("nan")))
    for _ in range(_WARMUP.value):
        state, metrics = step(state, device_batch, learning_rate)
    jax.block_until_ready(metrics)
    start, cpu_start = time.perf_counter(), time.process_time()
    for _ in range(_STEPS.value):
        state, metrics = step(state, device_batch, learning_rate)
    jax.block_until_ready(metrics)
    seconds = (time.perf_counter() - start) / _STEPS.value
    # Process CPU time: on a shared machine wall time depends on the neighbours; CPU seconds per
    # step (all threads) do much less.
    cpu_seconds = (time.process_time() - cpu_start) / _STEPS.value

    tokens = batch * seq
    per_token = flops_per_token(model_cfg, seq)
    model_tflops = per_token.train * tokens / seconds / 1e12
    attention_core = per_token.attention_core_sliding + per_token.attention_core_global
    device = jax.devices()[0]
    kind = device.device_kind
    if _PEAK.value:
        peak, peak_source = _PEAK.value * mesh.size, "--peak_tflops"
    elif _peak_from_table(kind) is not None:
        peak, peak_source = _peak_from_table(kind) * mesh.size, "vendor bf16 dense"
    else:
        peak = _measured_matmul_tflops()
        peak_source = "measured f32 2048^3 matmul"
    rows = [
        ("config", config_flags.get_config_filename(flags.FLAGS["config"])),
        ("device", f"{mesh.size} x {kind} ({_BACKEND.value})"),
        ("model dtype / params", f"{model_cfg.runtime.dtype} / {model_cfg.param_dtype}"),
        ("batch x seq", f"{batch} x {seq} = {tokens:,} tokens"),
        ("compile", f"{compile_seconds:.1f} s"),
        ("step time", f"{seconds * 1e3:.1f} ms"),
        ("process CPU time per step", f"{cpu_seconds * 1e3:.1f} ms (all threads)"),
        ("tokens/s", f"{tokens / seconds:,.0f}"),
        ("model FLOPs/token (train)", f"{per_token.train / 1e6:,.2f} M"),
        ("  of which attention core", f"{3 * attention_core / 1e6:,.2f} M"),
        ("XLA-counted FLOPs/token", f"{xla_flops / tokens / 1e6:,.2f} M"),
        ("model TFLOP/s", f"{model_tflops:.3f}"),
        ("peak TFLOP/s", f"{peak:.3f} ({peak_source})"),
        ("MFU", f"{100 * model_tflops / peak:.1f} %"),
    ]
    width = max(len(k) for k, _ in rows)
    print(f"| {'measure'.ljust(width)} | value |")
    print(f"|{'-' * (width + 2)}|-------|")
    for key, value in rows:
        print(f"| {key.ljust(width)} | {value} |")


if __name__ == "__main__":
    app.run(main)
