"""NamedShardings for parameters, optimizer state and batches, and jit with explicit shardings.

Parameter shardings come from the logical axis names the model puts on its weights
(`nn.with_logical_partitioning`), read from `jax.eval_shape` of the real `init` and resolved by a
rule preset. Any other state (optimizer moments, EMA copies...) gets the sharding of the parameter
whose path its leaf's path ends with and whose shape it has; everything else (step counters,
scalars, the RNG key) is replicated. Batches split their rows over the `batch` rule's axes and
their sequence over the `length` rule's axes.

`Parallelism.jit_train_step` / `jit_eval_step` trace a step under the mesh and the logical rules
(`nn.logical_axis_rules`, read by `nn.with_logical_constraint` and by the expert- and
context-parallel ops; `trace_context`). The expert-parallel options are the model's own
(`RuntimeConfig`), passed to the MoE layers as module attributes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from typing import Any, Callable, Iterator

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from mimo_jax.model.transformer import init_params
from mimo_jax.parallel import rules as rules_lib
from mimo_jax.parallel.config import MeshConfig
from mimo_jax.parallel.mesh import make_mesh

PyTree = Any


def logical_param_specs(model: nn.Module, rng: jax.Array | None = None) -> tuple[PyTree, PyTree]:
    """(abstract params, logical PartitionSpecs) of `model` via `jax.eval_shape` of its init.

    Nothing is allocated. The specs name logical axes (scanned layers add `layers` in front).
    """
    rng = jax.random.PRNGKey(0) if rng is None else rng
    boxed = jax.eval_shape(functools.partial(init_params, model, boxed=True), rng)
    return nn.meta.unbox(boxed), nn.get_partition_spec(boxed)


def _path_keys(path) -> tuple:
    keys = []
    for entry in path:
        for attr in ("key", "name", "idx"):
            if hasattr(entry, attr):
                keys.append(getattr(entry, attr))
                break
        else:
            keys.append(str(entry))
    return tuple(keys)


def match_params(tree: PyTree, params: PyTree, param_values: PyTree, default: Any) -> PyTree:
    """For each leaf of `tree`, the value of the parameter it copies, else `default`.

    A leaf copies a parameter when its path ends with the parameter's path and its shape equals
    the parameter's (optimizer moments, EMA copies...). `param_values` is a tree shaped like
    `params` (e.g. its shardings or PartitionSpecs); works on arrays and ShapeDtypeStructs.
    """
    values = jax.tree.leaves(param_values, is_leaf=lambda x: isinstance(x, PartitionSpec))
    by_path = {}
    for (path, leaf), value in zip(jax.tree_util.tree_flatten_with_path(params)[0], values):
        by_path[_path_keys(path)] = (tuple(leaf.shape), value)

    def pick(path, leaf):
        keys = _path_keys(path)
        shape = tuple(getattr(leaf, "shape", ()))
        for start in range(len(keys)):
            match = by_path.get(keys[start:])
            if match is not None and match[0] == shape:
                return match[1]
        return default

    return jax.tree_util.tree_map_with_path(pick, tree)


def shardings_like_params(tree: PyTree, params: PyTree, param_shardings: PyTree,
                          mesh: jax.sharding.Mesh) -> PyTree:
    """Shardings for a tree that holds copies of the parameters (e.g. optimizer state): a copy
    of a parameter gets its sharding (see `match_params`), every other leaf is replicated."""
    return match_params(tree, params, param_shardings, NamedSharding(mesh, PartitionSpec()))


def batch_spec(ndim: int, rules: rules_lib.Rules) -> PartitionSpec:
    """A batch leaf [B, T, ...] splits rows by `batch` and the sequence by `length`."""
    logical = ("batch", "length") + (None,) * max(ndim - 2, 0)
    return rules_lib.mesh_axes(logical[:ndim], rules)


@dataclasses.dataclass(frozen=True)
class Parallelism:
    """A mesh and a logical rule preset: everything `jit` needs."""

    mesh: jax.sharding.Mesh
    rules: rules_lib.Rules

    @classmethod
    def from_config(cls, config: MeshConfig,
                    devices: list[jax.Device] | None = None) -> "Parallelism":
        """Builds the mesh over `devices` (default all) and looks up the rule preset."""
        return cls(make_mesh(config, devices), rules_lib.get_rules(config.rules))

    @contextlib.contextmanager
    def trace_context(self) -> Iterator[None]:
        """The logical rules only (usable inside a traced function)."""
        with nn.logical_axis_rules(self.rules):
            yield

    def sharding(self, spec: PartitionSpec) -> NamedSharding:
        return NamedSharding(self.mesh, spec)

    @property
    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, PartitionSpec())

    def param_shardings(self, model: nn.Module) -> tuple[PyTree, PyTree]:
        """(abstract params, NamedShardings) for `model`'s parameters under the rules."""
        abstract, logical = logical_param_specs(model)
        shardings = nn.logical_to_mesh_sharding(logical, self.mesh, self.rules)
        return abstract, shardings

    def state_shardings(self, state: PyTree, params: PyTree, param_shardings: PyTree) -> PyTree:
        """Shardings for a train state (abstract or concrete); see `shardings_like_params`."""
        return shardings_like_params(state, params, param_shardings, self.mesh)

    def batch_shardings(self, batch: PyTree) -> PyTree:
        """Shardings for a batch of [B, T, ...] leaves (arrays or ShapeDtypeStructs)."""
        return jax.tree.map(lambda x: self.sharding(batch_spec(len(x.shape), self.rules)), batch)

    def put_batch(self, batch: PyTree, shardings: PyTree | None = None) -> PyTree:
        """Global arrays from this process's rows (all rows in a single-process run).

        Each process passes the rows its data loader produced; their order across processes
        follows `jax.process_index()`.
        """
        shardings = self.batch_shardings(batch) if shardings is None else shardings

        def put(x, sharding):
            x = np.asarray(x)
            global_shape = (x.shape[0] * jax.process_count(),) + x.shape[1:]
            return jax.make_array_from_process_local_data(sharding, x, global_shape)

        return jax.tree.map(put, batch, shardings)

    def jit(self, fn: Callable, in_shardings: Any, out_shardings: Any,
            donate_argnums: tuple[int, ...] = (),
            compiler_options: dict[str, Any] | None = None) -> Callable:
        """`jax.jit(fn)` with explicit shardings, traced and run inside `context()`.

        compiler_options: XLA options for this program only (e.g. a lower backend optimisation
        level for quick test compiles).
        """
        def traced(*args):
            with self.trace_context():
                return fn(*args)

        jitted = jax.jit(traced, in_shardings=in_shardings, out_shardings=out_shardings,
                         donate_argnums=donate_argnums, compiler_options=compiler_options)

        @functools.wraps(fn)
        def call(*args):
            with jax.set_mesh(self.mesh):
                return jitted(*args)

        call.lower = lambda *args: _lower_in(self.mesh, jitted, *args)  # type: ignore[attr-defined]
        return call

    def jit_train_step(self, step: Callable, state_shardings: PyTree, batch_shardings: PyTree,
                       donate_state: bool = True, extra_args: int = 0,
                       **jit_kwargs) -> Callable:
        """`(state, batch, *extra) -> (state, metrics)` under jit: state and batch in their
        shardings, `extra_args` trailing arguments (e.g. the learning rate) replicated, the new
        state in the state's shardings (donated), metrics replicated."""
        return self.jit(step, (state_shardings, batch_shardings) + (self.replicated,) * extra_args,
                        (state_shardings, self.replicated),
                        donate_argnums=(0,) if donate_state else (), **jit_kwargs)

    def jit_eval_step(self, step: Callable, state_shardings: PyTree, batch_shardings: PyTree,
                      **jit_kwargs) -> Callable:
        """`(state, batch) -> metrics` under jit, metrics replicated."""
        return self.jit(step, (state_shardings, batch_shardings), self.replicated, **jit_kwargs)


def _lower_in(mesh, jitted, *args):
    with jax.set_mesh(mesh):
        return jitted.lower(*args)
