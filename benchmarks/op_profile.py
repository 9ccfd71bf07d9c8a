r"""Where the time goes: per-op durations of a compiled train step, forward or decode loop.

    python benchmarks/op_profile.py --config configs/tiny.py --measure train
    python benchmarks/op_profile.py --config configs/tiny.py --measure decode --batch 32
    python benchmarks/op_profile.py --config configs/tiny.py --measure forward --top 30

Runs the program under `jax.profiler`, reads the trace back (`jax.profiler.ProfileData`) and sums
each executed HLO instruction's durations. Two tables: by kind (the instruction's name without
its number: `ynn_fusion`, `gather_bitcast_fusion`, `dot`, ...), and the slowest instructions with
the model code they come from (their `op_name` metadata). Loops and calls are left out of the
sums, as their durations hold their bodies'. The profiler adds a little to every op, so compare
shares within one table rather than absolute times with unprofiled runs.

  train    the trainer's jitted step (forward, backward, AdamW), on random full rows;
  forward  the model's forward (logits) on the same rows;
  decode   `--steps` greedy decode steps of `--batch` rows in one compiled loop, the sequence at
           `--context` positions (the same loop as `benchmarks/decode.py`'s step timing).
"""

from __future__ import annotations

import collections
import pathlib
import re
import sys
import tempfile
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from ml_collections import config_flags

# Run as a script from anywhere: the package lives one directory up, the decode loop beside.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

from decode import greedy_step_loop  # noqa: E402  (benchmarks/decode.py; needs the lines above)
from mimo_jax.inference import cache as kv_cache  # noqa: E402
from mimo_jax.inference import decode  # noqa: E402
from mimo_jax.model.transformer import MiMoV2Flash  # noqa: E402
from mimo_jax.train import partition  # noqa: E402
from mimo_jax.train.trainer import build_configs, step_program  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", "configs/tiny.py", "Run config.")
_MEASURE = flags.DEFINE_enum("measure", "train", ["train", "forward", "decode"], "What to profile.")
_CALLS = flags.DEFINE_integer("calls", 3, "Profiled calls (after one untimed call).")
_TOP = flags.DEFINE_integer("top", 20, "Rows of each table.")
_BATCH = flags.DEFINE_integer("batch", 1, "decode: rows.")
_STEPS = flags.DEFINE_integer("steps", 32, "decode: steps in the loop.")
_CONTEXT = flags.DEFINE_integer("context", 1024, "decode: positions already in the cache.")

# Instructions whose durations include other instructions' (their bodies).
_CONTAINERS = ("while", "conditional", "call", "async-start", "async-done")


def instructions(hlo_text: str) -> dict[str, tuple[str, str]]:
    """name -> (opcode, op_name metadata) of every instruction in a compiled module's text.

    A fusion without metadata of its own is named after the first instruction inside it that
    has some."""
    table, calls, computation_source = {}, {}, {}
    computation = None
    for line in hlo_text.splitlines():
        header = re.match(r"\s*(?:ENTRY )?%?([\w.\-]+) .*\{\s*$", line)
        if header and " = " not in line:
            computation = header.group(1)
            continue
        match = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = (.*)$", line)
        if not match:
            continue
        rest = match.group(2)
        if rest.startswith("("):  # a tuple shape: skip to its closing parenthesis
            depth = 0
            for end, char in enumerate(rest):
                depth += {"(": 1, ")": -1}.get(char, 0)
                if depth == 0:
                    break
            rest = rest[end + 1:]
        opcode = re.match(r"\s*\S*?\s*([\w\-]+)\(", rest)
        source = re.search(r'op_name="([^"]*)"', rest)
        called = re.search(r"calls=%?([\w.\-]+)", rest)
        table[match.group(1)] = (opcode.group(1) if opcode else "?",
                                 source.group(1) if source else "")
        if called:
            calls[match.group(1)] = called.group(1)
        if source and computation is not None:
            computation_source.setdefault(computation, source.group(1))
    for name, called in calls.items():
        if not table[name][1]:
            table[name] = (table[name][0], computation_source.get(called, ""))
    return table


def profile(run: Callable[[], object], known: dict[str, tuple[str, str]],
            calls: int) -> dict[str, tuple[float, int]]:
    """Per-instruction (seconds per call, executions per call) of `calls` runs of `run`;
    `known` is `instructions` of the program's compiled text."""
    jax.block_until_ready(run())  # compiles and warms up
    with tempfile.TemporaryDirectory() as logdir:
        jax.profiler.start_trace(logdir)
        for _ in range(calls):
            jax.block_until_ready(run())
        jax.profiler.stop_trace()
        trace = next(pathlib.Path(logdir).rglob("*.xplane.pb"))
        data = jax.profiler.ProfileData.from_file(str(trace))
    seconds, counts = collections.Counter(), collections.Counter()
    for plane in data.planes:
        for line in plane.lines:
            for event in line.events:
                if event.name in known and known[event.name][0] not in _CONTAINERS:
                    seconds[event.name] += event.duration_ns * 1e-9
                    counts[event.name] += 1
    return {name: (seconds[name] / calls, counts[name] // calls) for name in seconds}


def tables(ops: dict[str, tuple[float, int]], known: dict[str, tuple[str, str]],
           top: int) -> list[str]:
    """Markdown rows: time by kind of instruction, then the slowest instructions."""
    total = sum(s for s, _ in ops.values())
    kinds = collections.defaultdict(lambda: [0.0, 0])
    for name, (s, n) in ops.items():
        kind = kinds[re.sub(r"\.\d+$", "", name)]
        kind[0] += s
        kind[1] += n
    rows = [f"op time per call, summed over threads: {total * 1e3:.2f} ms", "",
            "| kind | ms per call | share | executions per call |", "|---|---|---|---|"]
    for kind, (s, n) in sorted(kinds.items(), key=lambda item: -item[1][0])[:top]:
        rows.append(f"| {kind} | {s * 1e3:.3f} | {100 * s / total:.1f}% | {n} |")
    rows += ["", "| instruction | ms per call | executions per call | source |",
             "|---|---|---|---|"]
    for name, (s, n) in sorted(ops.items(), key=lambda item: -item[1][0])[:top]:
        source = re.sub(r"jit\([^)]*\)/", "", known[name][1])[-90:]
        rows.append(f"| {name} | {s * 1e3:.3f} | {n} | {f'`{source}`' if source else '-'} |")
    return rows


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    configs = build_configs(_CONFIG.value)
    model_cfg, data_cfg = configs.model, configs.data
    rng = np.random.default_rng(0)
    shape = (data_cfg.batch_size, data_cfg.seq_len)
    host_batch = {"tokens": rng.integers(0, model_cfg.vocab_size, shape).astype(np.int32),
                  "segment_ids": np.ones(shape, np.int32),
                  "positions": np.tile(np.arange(shape[1], dtype=np.int32), (shape[0], 1))}
    parallelism = partition.make_parallelism(configs.mesh, configs.train.num_devices)
    program = step_program(configs, parallelism, seed=0)  # the trainer's own jitted step
    state = program.initial_state(seed=0)

    if _MEASURE.value == "train":
        batch = program.global_batch(host_batch, parallelism)
        learning_rate = np.float32(configs.train.learning_rate)
        step = program.train_step
        hlo = step.lower(state, batch, learning_rate).compile().as_text()
        holder = [state]

        def run():  # the step donates its state: carry the new one
            holder[0], metrics = step(holder[0], batch, learning_rate)
            return metrics
    elif _MEASURE.value == "forward":
        model = MiMoV2Flash(model_cfg)
        forward = jax.jit(lambda params, tokens: model.apply({"params": params}, tokens).logits)
        tokens = jnp.asarray(host_batch["tokens"])
        hlo = forward.lower(state.params, tokens).compile().as_text()

        def run():
            return forward(state.params, tokens)
    else:
        config, params = decode.loop_layout(model_cfg, state.params, None)
        batch, steps, context = _BATCH.value, _STEPS.value, _CONTEXT.value
        cache = kv_cache.init_cache(config, batch, context + steps, num_mtp_heads=0)["decoder"]
        jitted = greedy_step_loop(MiMoV2Flash(config), batch, context, steps)
        hlo = jitted.lower(params, cache).compile().as_text()

        def run():
            return jitted(params, cache)

    print(f"{_MEASURE.value}, {config_flags.get_config_filename(flags.FLAGS['config'])}, backend "
          f"{jax.default_backend()}, {_CALLS.value} profiled calls")
    known = instructions(hlo)
    print("\n".join(tables(profile(run, known, _CALLS.value), known, _TOP.value)))


if __name__ == "__main__":
    app.run(main)
