"""Decoding over a mesh: the weights split by the training rule presets (query heads, FFN and vocab
over `tensor`, experts over `expert`, model dims over `fsdp`), rows of the batch over the batch
axes, the KV cache split like the keys it holds (see `Attention.decode`).

`generate`, `speculative_generate` and `rollout` take `parallelism=` (a
`mimo_jax.parallel.Parallelism`) and run their one compiled program on its mesh through
`decoding`: the same program as on one device, traced under the mesh and the logical rules, so
XLA inserts the collectives. When the mesh splits the experts, MoE layers run the
expert-parallel dispatch (token copies travel to the experts' shards) without capacity: decoding
is dropless.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Iterator

import jax
import numpy as np

from mimo_jax.config import ModelConfig, with_runtime
from mimo_jax.model.transformer import MiMoV2Flash
from mimo_jax.ops.moe import expert_parallel
from mimo_jax.ops.spec_axes import spec_axes
from mimo_jax.parallel import Parallelism
from mimo_jax.parallel.rules import mesh_axes
from mimo_jax.parallel.sharding import shardings_like_params


def splits_experts(parallelism: Parallelism) -> bool:
    """Whether the mesh splits the experts (the rules map `experts` onto axes of size > 1)."""
    return expert_parallel.splits_experts(mesh_axes(("experts",), parallelism.rules),
                                          parallelism.mesh)


def batch_axes(parallelism: Parallelism) -> tuple[str, ...]:
    """The mesh axes the rules split the batch (rows) over."""
    return spec_axes(mesh_axes(("batch",), parallelism.rules)[0])


def batch_shards(parallelism: Parallelism) -> int:
    """How many pieces the rules cut the batch (rows) into on this mesh."""
    return math.prod(parallelism.mesh.shape[a] for a in batch_axes(parallelism))


def decoding_config(config: ModelConfig, parallelism: Parallelism) -> ModelConfig:
    """`config` as it decodes on this mesh: expert-parallel and dropless MoE when the experts
    are split, else the config's own dispatch."""
    if splits_experts(parallelism):
        return with_runtime(config, moe_impl="expert_parallel", expert_capacity_factor=0.0)
    return config


def check_batch(batch: int, parallelism: Parallelism) -> None:
    """Decoding splits the rows over the batch axes: `batch` must be a multiple of them."""
    shards = batch_shards(parallelism)
    if batch % shards:
        raise ValueError(f"decoding over mesh {dict(parallelism.mesh.shape)}: batch {batch} does "
                         f"not split over the batch axes {batch_axes(parallelism)} ({shards} "
                         f"pieces); use a batch that is a multiple of {shards}, or put the "
                         "devices on axes that do not split the batch (e.g. tensor)")


def place_params(model: MiMoV2Flash, params: Any, parallelism: Parallelism) -> Any:
    """`params` in their shardings under the rules (arrays already placed so are not copied)."""
    abstract, shardings = parallelism.param_shardings(model)
    shardings = shardings_like_params(params, abstract, shardings, parallelism.mesh)
    return jax.tree.map(lambda x, s: jax.device_put(x, s), params, shardings)


def place_rows(x: Any, parallelism: Parallelism) -> jax.Array:
    """A [B, ...] host array replicated on the mesh (the program splits it by its rules)."""
    return jax.device_put(np.asarray(x), parallelism.replicated)


def prepare(model: MiMoV2Flash, params: Any, rows: tuple[Any, ...],
            parallelism: Parallelism | None) -> tuple[ModelConfig, Any, tuple[Any, ...]]:
    """(config, params, rows) a generation runs with: unchanged without a mesh; on a mesh the
    decoding config, the params in their shardings and the row arrays (prompts, lengths, stop
    tokens) placed on the mesh, after checking that the batch splits."""
    if parallelism is None:
        return model.config, params, rows
    check_batch(rows[0].shape[0], parallelism)
    return (decoding_config(model.config, parallelism), place_params(model, params, parallelism),
            tuple(place_rows(x, parallelism) for x in rows))


@contextlib.contextmanager
def decoding(parallelism: Parallelism | None) -> Iterator[None]:
    """The mesh and logical rules a generation traces and runs under (nothing when None)."""
    if parallelism is None:
        yield
        return
    with jax.set_mesh(parallelism.mesh), parallelism.trace_context():
        yield
