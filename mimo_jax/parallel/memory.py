"""Bytes per device of a training run on a named TPU or GPU slice, before anything is compiled.

Parameters, gradients and optimizer state are exact: their shapes come from `jax.eval_shape` of
the real `init` (and of the real optimizer's `init`), their splits from the rule preset resolved
on the slice's mesh. Activations are an estimate from the model's shapes under the same rules:

  saved      per decoder layer, what the remat policy keeps for the backward pass: the layer
             input ("full"), plus every matmul output ("save_dots", "save_dots_no_batch"), or
             every intermediate ("none"). Attention internals are assumed to live inside the
             flash kernel (only q, k, v and the output count).
  working    the largest layer's intermediates and their gradients while it is recomputed and
             differentiated (expert-parallel send/receive buffers included).
  heads      float32 logits of the LM head and each MTP head, kept for the loss's backward pass,
             plus one logits gradient.
  MTP blocks the MTP heads' layers, which are not rematerialised.
With `fp8`, the inputs of the FP8 GEMMs (the attention norm's output into q/k/v, the dense FFN's
input and its down projection's input) are kept for the backward pass as e4m3 values plus a
float32 scale per 128 (`FP8_ITEMSIZE` bytes each, `mimo_jax.ops.fp8.matmul`); everything else is
as without it. That changes "none" and the working set; "full" keeps only layer inputs and
"save_dots" adds matmul outputs (compute dtype either way), so their saved rows do not move. The
experts' GEMM inputs reach the dispatch in the compute dtype (`mimo_jax.ops.fp8.experts`): no
saving is counted there.
Legend: B batch rows per micro-batch, T sequence length, D model dim, F ffn dim, E experts,
k experts per token, V vocab, N/K query/KV heads, H/U q/k and value head dims, R receive rows.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from mimo_jax.config import MOE, SWA, ModelConfig, replace_model
from mimo_jax.model.transformer import MiMoV2Flash
from mimo_jax.ops.moe.expert_parallel import receive_capacity
from mimo_jax.ops.spec_axes import pad_spec
from mimo_jax.parallel import rules as rules_lib
from mimo_jax.parallel.config import MESH_AXES, MeshConfig
from mimo_jax.parallel.mesh import mesh_shape
from mimo_jax.parallel.sharding import logical_param_specs, match_params

GIB = 1024 ** 3
# Bytes per element of an FP8 GEMM input kept for the backward pass: e4m3 + a float32 per 128.
FP8_ITEMSIZE = 1 + 4 / 128

# chips per slice-name unit and HBM per chip. TPU v4/v5p names count TensorCores (2 per chip);
# v5e/v6e names count chips.
TPU_TYPES = {"v4": (2, 32 * GIB), "v5p": (2, 95 * GIB), "v5e": (1, 16 * GIB),
             "v6e": (1, 32 * GIB)}
GPU_TYPES = {"A100": 80 * 10 ** 9, "H100": 80 * 10 ** 9, "H200": 141 * 10 ** 9,
             "B200": 180 * 10 ** 9}
GPUS_PER_HOST = 8
# Share of HBM a plan may use: XLA keeps temporaries and fragmentation outside the estimate.
USABLE_FRACTION = 0.9


@dataclasses.dataclass(frozen=True)
class SliceSpec:
    """A named accelerator slice: devices in all, slices (TPU slices or GPU hosts), HBM each."""

    name: str
    num_devices: int
    num_slices: int
    hbm_bytes: int


def parse_slice(name: str) -> SliceSpec:
    """"v5p-512", "2xv5p-256" (two slices), "v6e-256", "8xH200", "64xH100" (8 hosts)."""
    match = re.fullmatch(r"(?:(\d+)x)?(v4|v5p|v5e|v6e)-(\d+)", name)
    if match:
        slices, kind, size = int(match.group(1) or 1), match.group(2), int(match.group(3))
        cores_per_chip, hbm = TPU_TYPES[kind]
        if size % cores_per_chip:
            raise ValueError(f"slice {name!r}: {kind} sizes count {cores_per_chip} per chip")
        return SliceSpec(name, slices * size // cores_per_chip, slices, hbm)
    match = re.fullmatch(r"(\d+)x(A100|H100|H200|B200)", name)
    if match:
        count, kind = int(match.group(1)), match.group(2)
        hosts = max(1, count // GPUS_PER_HOST)
        if count > GPUS_PER_HOST and count % GPUS_PER_HOST:
            raise ValueError(f"slice {name!r}: more than one host needs a multiple of "
                             f"{GPUS_PER_HOST} GPUs")
        return SliceSpec(name, count, hosts, GPU_TYPES[kind])
    raise ValueError(f"slice {name!r} is not known; use e.g. v5p-512, 2xv5p-256, v6e-256, "
                     f"v5e-256, v4-512, 8xH200, 64xH100 (TPU types {sorted(TPU_TYPES)}, "
                     f"GPU types {sorted(GPU_TYPES)})")


def describe_slice(slice_spec: SliceSpec, axis_sizes: dict[str, int], rules: str) -> str:
    """'slice NAME: N devices x H GiB HBM; mesh AXIS=SIZE, ...; rules PRESET' (a plan's line)."""
    mesh = ", ".join(f"{a}={axis_sizes[a]}" for a in MESH_AXES if axis_sizes[a] > 1)
    return (f"slice {slice_spec.name}: {slice_spec.num_devices} devices x "
            f"{slice_spec.hbm_bytes / GIB:.1f} GiB HBM; mesh {mesh or 'one device'}; rules {rules}")


@dataclasses.dataclass
class MemoryRow:
    name: str
    bytes: int
    detail: str = ""


@dataclasses.dataclass
class MemoryPlan:
    """The estimate: rows of bytes per device, the mesh it assumed, and whether it fits."""

    slice: SliceSpec
    axis_sizes: dict[str, int]
    rules: str
    rows: list[MemoryRow]
    tokens_per_device: int

    @property
    def total(self) -> int:
        return sum(r.bytes for r in self.rows)

    @property
    def usable(self) -> int:
        return int(self.slice.hbm_bytes * USABLE_FRACTION)

    @property
    def fits(self) -> bool:
        return self.total <= self.usable


def _local_elements(shape: tuple[int, ...], spec, sizes: dict[str, int]) -> int:
    """Elements of the largest shard of an array with this PartitionSpec."""
    count = 1
    for dim, entry in zip(shape, pad_spec(spec, len(shape))):
        parts = math.prod(sizes[a] for a in rules_lib.spec_axes(entry))
        count *= -(-dim // parts)
    return count


def tree_bytes(tree: Any, specs: Any, sizes: dict[str, int],
               dtype_of: Callable[[Any], np.dtype] | None = None) -> int:
    """Bytes on the fullest device of a tree of arrays (or shapes) split by `specs`
    (PartitionSpecs) over a mesh of axis `sizes`; `dtype_of(leaf)` overrides the dtypes."""
    total = 0
    for leaf, spec in zip(jax.tree.leaves(tree), jax.tree.leaves(
            specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))):
        dtype = np.dtype(leaf.dtype) if dtype_of is None else dtype_of(leaf)
        total += _local_elements(tuple(leaf.shape), spec, sizes) * dtype.itemsize
    return total


class _Activations:
    """Per-device bytes of activations named by logical axes (see the module docstring)."""

    def __init__(self, config: ModelConfig, rules: rules_lib.Rules, sizes: dict[str, int],
                 batch: int, length: int):
        self.config, self.rules, self.sizes = config, rules, sizes
        self.batch, self.length = batch, length
        self.compute = np.dtype(config.runtime.dtype).itemsize

    def bytes(self, shape: tuple[int, ...], logical: tuple[str | None, ...],
              itemsize: float | None = None) -> int:
        spec = rules_lib.mesh_axes(logical, self.rules)
        return math.ceil(_local_elements(shape, spec, self.sizes) * (itemsize or self.compute))

    def gemm_input(self, width: int, logical: str | None) -> int:
        """An activation [B, T, width] that an FP8 GEMM keeps for its backward pass (e4m3 plus
        scales with `fp8`, else the compute dtype)."""
        return self.tokens(width, logical, FP8_ITEMSIZE if self.config.fp8 else None)

    def tokens(self, width: int, logical: str | None = "embed", itemsize: float | None = None):
        return self.bytes((self.batch, self.length, width), ("batch", "length", logical), itemsize)

    @property
    def local_tokens(self) -> int:
        spec = rules_lib.mesh_axes(("batch", "length"), self.rules)
        return _local_elements((self.batch, self.length), spec, self.sizes)

    def attention(self, layer_type: str) -> tuple[list[int], list[int]]:
        """(matmul outputs, other intermediates) of one attention block."""
        att = self.config.attention(layer_type)
        b, t = self.batch, self.length
        q = self.bytes((b, t, att.num_heads, att.qk_head_dim),
                       ("batch", "length", "heads", "head_dim"))
        k = self.bytes((b, t, att.num_kv_heads, att.qk_head_dim),
                       ("batch", "length", "kv_heads", "head_dim"))
        v = self.bytes((b, t, att.num_kv_heads, att.v_head_dim),
                       ("batch", "length", "kv_heads", "head_dim"))
        out = self.bytes((b, t, att.num_heads, att.v_head_dim),
                         ("batch", "length", "heads", "head_dim"))
        d = self.tokens(self.config.hidden_size)
        # o_proj out; attention out (o_proj's input, not FP8), norm out (q/k/v's input), residual
        return [q, k, v, d], [out, self.gemm_input(self.config.hidden_size, "embed"), d]

    def dense_ffn(self, width: int) -> tuple[list[int], list[int]]:
        f = self.tokens(width, "mlp")
        d = self.tokens(self.config.hidden_size)
        # gate, up, down outputs; down's input, the FFN's input (gate/up's)
        return [f, f, d], [self.gemm_input(width, "mlp"),
                           self.gemm_input(self.config.hidden_size, "embed")]

    def moe(self) -> tuple[list[int], list[int]]:
        cfg = self.config
        k, e, d = cfg.num_experts_per_token, cfg.num_experts, cfg.hidden_size
        router = self.tokens(e, None, 4)
        expert_spec = rules_lib.mesh_axes(("experts", "embed", "mlp"), self.rules)
        shards = math.prod(self.sizes[a] for a in rules_lib.spec_axes(expert_spec[0]))
        f_local = -(-cfg.moe_intermediate_size // math.prod(
            self.sizes[a] for a in rules_lib.spec_axes(expert_spec[2])))
        n = self.local_tokens
        copies = n * k
        if cfg.runtime.expert_parallel_when_split and shards > 1:
            rows = receive_capacity(n, k, shards, e // shards,
                                    cfg.runtime.expert_capacity_factor)
            dots = [router, rows * f_local * self.compute * 2, rows * d * self.compute]
            other = [copies * d * self.compute * 2, rows * d * self.compute,
                     rows * f_local * self.compute]
        elif cfg.runtime.moe_impl == "dense":
            dots = [router, n * e * f_local * self.compute * 2, n * e * d * self.compute]
            other = [n * e * f_local * self.compute]
        else:
            dots = [router, copies * f_local * self.compute * 2, copies * d * self.compute]
            other = [copies * d * self.compute, copies * f_local * self.compute]
        return dots, other

    def layer(self, layer_type: str, mlp_type: str) -> tuple[int, int, int]:
        """(input, matmul outputs, everything) bytes of one decoder layer."""
        x = self.tokens(self.config.hidden_size)
        a_dots, a_other = self.attention(layer_type)
        if mlp_type == MOE:
            f_dots, f_other = self.moe()
        else:
            f_dots, f_other = self.dense_ffn(self.config.dense_intermediate_size)
        dots = sum(a_dots) + sum(f_dots)
        return x, dots, x + dots + sum(a_other) + sum(f_other) + x

    def rows(self) -> list[MemoryRow]:
        cfg = self.config
        saved = working = 0
        for layer_type, mlp_type in zip(cfg.layer_types, cfg.mlp_types):
            x, dots, everything = self.layer(layer_type, mlp_type)
            kept = {"none": everything, "full": x}.get(cfg.runtime.remat_policy, x + dots)
            saved += kept
            working = max(working, 2 * everything)
        mtp = 0
        for _ in range(cfg.num_mtp_heads):
            _, _, everything = self.layer(SWA, "dense")
            mtp += everything + 3 * self.tokens(cfg.hidden_size) + self.tokens(
                2 * cfg.hidden_size, "mlp")
        logits = self.tokens(cfg.vocab_size, "vocab", 4)
        heads = (1 + cfg.num_mtp_heads + 1) * logits
        return [
            MemoryRow("activations: saved", saved,
                      f"{cfg.num_layers} layers, remat {cfg.runtime.remat_policy!r}"),
            MemoryRow("activations: working", working,
                      "largest layer recomputed + its gradients"),
            MemoryRow("activations: heads", heads,
                      f"f32 logits of {1 + cfg.num_mtp_heads} heads + 1 gradient"),
            MemoryRow("activations: MTP blocks", mtp, f"{cfg.num_mtp_heads} heads, no remat"),
        ]


def plan_memory(model_config: ModelConfig, mesh_config: MeshConfig, slice_spec: SliceSpec, *,
                batch_size: int, seq_len: int, grad_accum_steps: int = 1,
                param_dtype: str | None = None, optimizer_dtype: str = "float32",
                optimizer_factory: Callable[[Any], Any] | None = None) -> MemoryPlan:
    """The per-device memory of one train step (see the module docstring).

    batch_size: global rows per step, split into `grad_accum_steps` micro-batches.
    optimizer_factory: params -> optax transformation (default AdamW); its float state leaves
      are counted in `optimizer_dtype`.
    """
    if param_dtype:
        model_config = replace_model(model_config, param_dtype=param_dtype)
    if batch_size % grad_accum_steps:
        raise ValueError(f"batch size {batch_size} is not a multiple of {grad_accum_steps} "
                         "micro-batches")
    ici, dcn = mesh_shape(mesh_config, slice_spec.num_devices, slice_spec.num_slices)
    sizes = {a: i * d for a, i, d in zip(MESH_AXES, ici, dcn)}
    rules = rules_lib.get_rules(mesh_config.rules)
    params, logical = logical_param_specs(MiMoV2Flash(model_config))
    specs = nn.logical_to_mesh(logical, rules)
    param_bytes = tree_bytes(params, specs, sizes)

    optimizer = optax.adamw(1e-4) if optimizer_factory is None else optimizer_factory(params)
    opt_state = jax.eval_shape(optimizer.init, params)
    opt_specs = match_params(opt_state, params, specs, jax.sharding.PartitionSpec())
    opt_dtype = np.dtype(optimizer_dtype)

    def state_dtype(leaf):
        # jnp.issubdtype: numpy does not count bfloat16 as a float.
        return opt_dtype if jnp.issubdtype(leaf.dtype, jnp.floating) else np.dtype(leaf.dtype)

    opt_bytes = tree_bytes(opt_state, opt_specs, sizes, state_dtype)
    rows = [MemoryRow("params", param_bytes, f"{model_config.param_dtype}"),
            MemoryRow("optimizer state", opt_bytes, f"{optimizer_dtype} moments"),
            MemoryRow("gradients", param_bytes, f"{model_config.param_dtype}, like params")]
    if grad_accum_steps > 1:
        rows.append(MemoryRow("gradient accumulator", param_bytes,
                              f"{grad_accum_steps} micro-batches"))
    activations = _Activations(model_config, rules, sizes, batch_size // grad_accum_steps,
                               seq_len)
    rows += activations.rows()
    return MemoryPlan(slice_spec, sizes, mesh_config.rules, rows, activations.local_tokens)
