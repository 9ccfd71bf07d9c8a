"""The bytes per device a training run needs on a named TPU or GPU slice; does it fit?

    plan, table = plan_for_config(config, "v5p-512", param_dtype="bfloat16")

`python -m mimo_jax.plan` prints the table; the launcher (`launch/jobs.py`) checks `plan.fits`
before queueing a job. The mesh (`config.mesh`), batch and sequence length (`config.data`),
micro-batches and optimizer (`config.train`) are the run's; parameter and optimizer shapes come
from `jax.eval_shape` of the real model and optimizer, their splits from the rule preset. Nothing
is allocated or compiled. See `mimo_jax/parallel/memory.py` for what each row counts.
"""

from __future__ import annotations

import functools

import ml_collections

from mimo_jax.config import ConfigError, ModelConfig, model_config_from_dict, with_runtime
from mimo_jax.ops.moe.expert_parallel import dropless_capacity_factor
from mimo_jax.parallel import rules as rules_lib
from mimo_jax.parallel.config import MeshConfig, mesh_config_from_dict
from mimo_jax.parallel.memory import (GIB, USABLE_FRACTION, MemoryPlan, describe_slice, parse_slice,
                                      plan_memory)
from mimo_jax.train import optimizer as optim
from mimo_jax.train.config import train_config_from_dict


def _gib(count: int) -> str:
    return f"{count / GIB:8.2f} GiB"


def format_plan(plan: MemoryPlan, header: str) -> str:
    """The table printed by the command."""
    lines = [header,
             f"{describe_slice(plan.slice, plan.axis_sizes, plan.rules)}; "
             f"{plan.tokens_per_device:,} tokens per device per micro-batch",
             f"{'':26s}{'per device':>12s}"]
    for row in plan.rows:
        lines.append(f"{row.name:26s}{_gib(row.bytes)}   {row.detail}")
    lines.append(f"{'total':26s}{_gib(plan.total)}")
    verdict = "fits" if plan.fits else "does NOT fit"
    lines.append(f"{verdict}: {plan.total / plan.slice.hbm_bytes:.0%} of HBM "
                 f"(limit {USABLE_FRACTION:.0%}, {_gib(plan.usable).strip()}, leaves room for "
                 f"XLA temporaries)")
    return "\n".join(lines)


def expert_axes(mesh_config: MeshConfig, axis_sizes: dict[str, int]) -> tuple[str, ...]:
    """Mesh axes of size > 1 that the rules split the experts over."""
    spec = rules_lib.mesh_axes(("experts",), rules_lib.get_rules(mesh_config.rules))
    return tuple(a for a in rules_lib.spec_axes(spec[0]) if axis_sizes[a] > 1)


def plan_for_config(config: ml_collections.ConfigDict, slice_name: str, *,
                    param_dtype: str | None = None,
                    optimizer_dtype: str = "float32") -> tuple[MemoryPlan, str]:
    """The memory plan of a run config on a slice, and its printed table (with notes).

    Raises ConfigError (bad config) or ValueError (unknown slice).
    """
    model_config = model_config_from_dict(config.model)
    mesh_config = mesh_config_from_dict(config.get("mesh"))
    slice_spec = parse_slice(slice_name)
    data = config.get("data")
    if data is None:
        raise ConfigError("the config has no 'data' section (batch_size, seq_len)")
    train = config.get("train")
    accum, optimizer_factory = 1, None
    if train is not None:
        # The trainer's own optimizer (its state tree is what a run holds).
        train_config = train_config_from_dict(train)
        accum = train_config.grad_accum_steps
        if train_config.compute_dtype:
            model_config = with_runtime(model_config, dtype=train_config.compute_dtype)
        optimizer_factory = functools.partial(optim.make_optimizer, train_config)
    plan = plan_memory(model_config, mesh_config, slice_spec, batch_size=int(data.batch_size),
                       seq_len=int(data.seq_len), grad_accum_steps=accum,
                       param_dtype=param_dtype, optimizer_dtype=optimizer_dtype,
                       optimizer_factory=optimizer_factory)
    runtime = model_config.runtime
    header = (f"batch {int(data.batch_size)} x {int(data.seq_len)} tokens in {accum} "
              f"micro-batch(es); compute {runtime.dtype}{'; FP8 GEMMs' if model_config.fp8 else ''}"
              f"; MoE {runtime.moe_impl}"
              + (f" (capacity factor {runtime.expert_capacity_factor:g})"
                 if runtime.expert_parallel_when_split else ""))
    table = format_plan(plan, header)
    if model_config.fp8:
        table += "\n" + fp8_note(model_config)
    split = expert_axes(mesh_config, plan.axis_sizes)
    if split and runtime.expert_parallel_when_split:
        table += "\n" + capacity_note(model_config)
    if split and not runtime.expert_parallel_when_split:
        table += (f"\nnote: experts are split over {split} but model.runtime.moe_impl="
                  f"{runtime.moe_impl!r}; set --config.model.runtime.moe_impl=expert_parallel so "
                  "tokens travel to the experts instead of the compiler gathering every "
                  "expert's weights")
    return plan, table


def capacity_note(model_config: ModelConfig) -> str:
    """One line on what the expert capacity drops (`ops/moe/expert_parallel.py`)."""
    runtime, k, e = model_config.runtime, model_config.num_experts_per_token, model_config.num_experts
    dropless = dropless_capacity_factor(k, e)
    if runtime.expert_capacity_factor == 0:
        return "expert capacity: dropless (capacity factor 0; the worst-case receive buffer)"
    if runtime.expert_capacity_factor >= dropless:
        return (f"expert capacity: factor {runtime.expert_capacity_factor:g} >= E/k = "
                f"{dropless:g}, dropless")
    return (f"expert capacity: factor {runtime.expert_capacity_factor:g} may drop token copies: a "
            f"shard sends each expert at most ceil({runtime.expert_capacity_factor:g} x local "
            f"tokens x {k} / {e}) copies, those of the largest gate weights (the rest count as "
            f"train metric dropped_copies; evaluation is dropless); never drops at factor 0 or "
            f">= E/k = {dropless:g}")


def fp8_note(model_config: ModelConfig) -> str:
    """One line on what FP8 changes in the plan (`mimo_jax/parallel/memory.py`)."""
    policy = model_config.runtime.remat_policy
    where = ("the saved activations, the working set and the MTP blocks" if policy == "none" else
             "the working set and the MTP blocks only: remat "
             f"{policy!r} saves layer inputs{' and matmul outputs' if policy != 'full' else ''}, "
             "which stay in the compute dtype")
    return ("fp8: q/k/v and dense-FFN GEMM inputs are kept for the backward pass as e4m3 + a "
            f"float32 scale per 128 (~1.03 bytes); this moves {where}. Parameters, gradients and "
            "optimizer state are unchanged (float32 master weights); expert GEMM inputs are "
            "counted in the compute dtype")
