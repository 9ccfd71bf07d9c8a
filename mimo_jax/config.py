"""The model's config: its architecture (`ModelConfig`) and how it is computed (`RuntimeConfig`).

Configs are written as ConfigDicts in `configs/*.py` (so they can be overridden from the command
line); everything downstream reads these frozen dataclasses instead. A bad value fails at start-up
with a `ConfigError` naming the key and the value (`mimo_jax.config_reader`).

The line between the two: `ModelConfig`'s own fields are what a checkpoint must match (parameter
shapes and dtypes, and the layout of the layer stack: `param_dtype`, `scan_layers`); its `runtime`
section (`config.model.runtime` in a run config) holds what may change between runs of one
checkpoint: compute dtype, kernel and dispatch backends, rematerialisation, expert-parallel options.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from mimo_jax.config_reader import (ConfigError, Section, above, at_least, each_one_of, fail,
                                    one_of, option, parse_value, read_section, replace, to_dict)
from mimo_jax.ops.moe.expert_parallel import TRANSPORTS as EXPERT_TRANSPORTS

__all__ = [
    "ATTENTION_IMPLS", "DENSE", "DTYPES", "EXPERT_TRANSPORTS", "GA", "MOE", "MOE_IMPLS",
    "REMAT_POLICIES", "RUNTIME_KEYS", "SWA", "AttentionConfig", "ConfigError", "ModelConfig",
    "RuntimeConfig", "architecture", "default_layer_types", "default_mlp_types",
    "model_config_from_dict", "model_config_to_dict", "replace_model", "with_runtime",
]

SWA = "sliding"
GA = "global"
DENSE = "dense"
MOE = "moe"

ATTENTION_IMPLS = ("auto", "reference", "chunked", "pallas")
MOE_IMPLS = ("auto", "dense", "ragged", "blocked", "gathered", "expert_parallel")
REMAT_POLICIES = ("none", "full", "save_dots", "save_dots_no_batch")
DTYPES = ("float32", "bfloat16", "float16")


@dataclasses.dataclass(frozen=True, kw_only=True)
class RuntimeConfig(Section):
    """How the model is computed: may change between runs of one checkpoint.

    dtype: compute dtype (parameters are cast to it in each matmul; `param_dtype` is stored).
    attention_impl, attention_chunk_size: attention backend ("auto" picks per device) and the
      query/key block of the chunked one.
    moe_impl: routed-expert dispatch. "auto" (the default) is "expert_parallel" where the mesh
      splits the experts and otherwise the fastest one-device dispatch for the backend
      ("blocked" on CPU, "ragged" on TPU and GPU); "expert_parallel" without split experts is
      that same one-device dispatch; a one-device backend runs "gathered" on calls with fewer
      token copies than experts (decoding at small batch).
    remat_policy: what a decoder layer keeps for the backward pass.
    expert_capacity_factor: the expert-parallel receive buffer holds ceil(factor * expected token
      copies per shard) rows; copies past it are dropped. 0 means dropless (the worst case).
    expert_transport: how token copies move between expert shards: "ragged_all_to_all" (TPU, GPU),
      "all_to_all" (a padded dense exchange that every backend runs, CPU included) or "auto".
    """

    SECTION = "model.runtime"

    dtype: str = option("float32", check=one_of(DTYPES))
    attention_impl: str = option("auto", check=one_of(ATTENTION_IMPLS))
    attention_chunk_size: int = option(128, check=at_least(1))
    moe_impl: str = option("auto", check=one_of(MOE_IMPLS))
    remat_policy: str = option("none", check=one_of(REMAT_POLICIES))
    expert_capacity_factor: float = option(0.0, check=at_least(0, "0 = dropless"))
    expert_transport: str = option("auto", check=one_of(EXPERT_TRANSPORTS))

    @property
    def expert_parallel_when_split(self) -> bool:
        """Whether a mesh that splits the experts runs the expert-parallel dispatch (with its
        receive capacity) rather than the compiler gathering every expert's weights."""
        return self.moe_impl in ("expert_parallel", "auto")


RUNTIME_KEYS = tuple(f.name for f in dataclasses.fields(RuntimeConfig))


@dataclasses.dataclass(frozen=True, kw_only=True)
class AttentionConfig(Section):
    """One attention layer type (sliding-window or global).

    `sliding_window` counts the keys a query sees, itself included: W=129 means the query and the
    128 tokens before it (the reference's `sliding_window_size=128`). None means full causal.
    """

    num_heads: int = option(check=at_least(1))
    num_kv_heads: int = option(check=at_least(1))
    qk_head_dim: int = option(check=at_least(1))
    v_head_dim: int = option(check=at_least(1))
    rope_dim: int = option()
    rope_theta: float = option(check=above(0))
    sliding_window: int | None = option(check=at_least(1, "or None"))
    attention_sink: bool = option()

    def validate(self, prefix: str) -> None:
        if self.num_heads % self.num_kv_heads:
            fail(f"{prefix}.num_kv_heads", self.num_kv_heads,
                 f"must divide {prefix}.num_heads={self.num_heads}")
        if self.rope_dim < 0 or self.rope_dim > self.qk_head_dim or self.rope_dim % 2:
            fail(f"{prefix}.rope_dim", self.rope_dim,
                 f"must be even and in [0, qk_head_dim={self.qk_head_dim}]")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig(Section):
    """Architecture of MiMo-V2-Flash and its scaled-down relatives (SPEC.md has the numbers), and
    under `runtime` how it is computed.

    In a run config `layer_types` and `mlp_types` may be left empty ("") and derived from the
    input-only keys `global_period` (layer 0 and every `global_period`-th layer after it are
    global) and `num_dense_layers` (the first ones use a dense SwiGLU, the rest MoE).
    """

    SECTION = "model"
    MOVED = {name: f"model.runtime.{name}" for name in RUNTIME_KEYS}
    INPUT_KEYS = ("global_period", "num_dense_layers")

    vocab_size: int = option(check=at_least(1))
    hidden_size: int = option(check=at_least(1))
    num_layers: int = option(check=at_least(1))
    layer_types: tuple[str, ...] = option(check=each_one_of((SWA, GA)))  # per layer
    mlp_types: tuple[str, ...] = option(check=each_one_of((DENSE, MOE)))  # per layer
    sliding: AttentionConfig = option()
    full: AttentionConfig = option()
    value_scale: float = option()
    dense_intermediate_size: int = option(check=at_least(1))
    moe_intermediate_size: int = option(check=at_least(1))
    num_experts: int = option(check=at_least(1))
    num_experts_per_token: int = option(check=at_least(1))
    routed_scaling_factor: float = option()
    norm_eps: float = option(check=above(0))
    init_std: float = option(check=above(0))
    num_mtp_heads: int = option(check=at_least(0))
    param_dtype: str = option(check=one_of(DTYPES))
    scan_layers: bool = option()  # runs of identical layers as one scanned parameter stack
    # FP8 (e4m3, block-scaled) GEMMs in q/k/v, the dense SwiGLU and the routed experts
    # (`mimo_jax.ops.fp8`). Parameters keep their shapes and `param_dtype` (float32 master
    # weights), so it is no part of `architecture`: a checkpoint trained with it loads without it
    # and the other way round; a saved config without the key reads as False.
    fp8: bool = option(False)
    runtime: RuntimeConfig = option(RuntimeConfig())

    @property
    def moe_layers(self) -> tuple[int, ...]:
        """Indices of the layers with an MoE FFN."""
        return tuple(i for i, t in enumerate(self.mlp_types) if t == MOE)

    def attention(self, layer_type: str) -> AttentionConfig:
        """The attention config of a layer type (SWA or GA)."""
        return self.sliding if layer_type == SWA else self.full

    def validate(self, prefix: str) -> None:
        if self.num_experts_per_token > self.num_experts:
            fail(f"{prefix}.num_experts_per_token", self.num_experts_per_token,
                 f"top-k cannot exceed {prefix}.num_experts={self.num_experts}")
        for name in ("layer_types", "mlp_types"):
            seq = getattr(self, name)
            if len(seq) != self.num_layers:
                fail(f"{prefix}.{name}", seq,
                     f"has {len(seq)} entries but {prefix}.num_layers={self.num_layers}")
        if self.sliding.qk_head_dim != self.full.qk_head_dim or (
                self.sliding.v_head_dim != self.full.v_head_dim):
            # The MTP heads and the KV-cache layout assume one head geometry.
            fail(f"{prefix}.full.qk_head_dim", self.full.qk_head_dim,
                 "sliding and global layers must share qk/v head dims")

    @classmethod
    def derive(cls, values: dict[str, Any], prefix: str) -> dict[str, Any]:
        """Empty `layer_types` / `mlp_types` from `global_period` / `num_dense_layers`."""
        values = dict(values)
        period, num_dense = values.pop("global_period", None), values.pop("num_dense_layers", None)
        if "num_layers" not in values:
            return values  # reported as missing
        num_layers = parse_value(int, values["num_layers"], f"{prefix}.num_layers")
        if values.get("layer_types") in (None, ""):
            if period is None:
                raise ConfigError(f"config key '{prefix}.global_period' is missing")
            period = parse_value(int, period, f"{prefix}.global_period")
            if period < 1:
                fail(f"{prefix}.global_period", period, "must be >= 1")
            values["layer_types"] = default_layer_types(num_layers, period)
        if values.get("mlp_types") in (None, ""):
            if num_dense is None:
                raise ConfigError(f"config key '{prefix}.num_dense_layers' is missing")
            num_dense = parse_value(int, num_dense, f"{prefix}.num_dense_layers")
            if not 0 <= num_dense <= num_layers:
                fail(f"{prefix}.num_dense_layers", num_dense,
                     f"must be in [0, num_layers={num_layers}]")
            values["mlp_types"] = default_mlp_types(num_layers, num_dense)
        return values


def default_layer_types(num_layers: int, global_period: int) -> tuple[str, ...]:
    """Layer 0 and every `global_period`-th layer after it are global: `i == 0 or (i+1) % p == 0`."""
    return tuple(GA if i == 0 or (i + 1) % global_period == 0 else SWA for i in range(num_layers))


def default_mlp_types(num_layers: int, num_dense_layers: int) -> tuple[str, ...]:
    """The first `num_dense_layers` layers use a dense SwiGLU, the rest MoE."""
    return tuple(DENSE if i < num_dense_layers else MOE for i in range(num_layers))


def model_config_from_dict(cfg: Mapping[str, Any]) -> ModelConfig:
    """Builds and validates a `ModelConfig` from the `model` section of a run config (a ConfigDict
    or a mapping, e.g. `model_config_to_dict`'s output)."""
    return read_section(ModelConfig, cfg)


def model_config_to_dict(config: ModelConfig) -> dict[str, Any]:
    """The inverse of `model_config_from_dict`: JSON-ready, explicit layer/mlp types, the runtime
    as a nested dict."""
    return to_dict(config)


def architecture(config: ModelConfig) -> dict[str, Any]:
    """What a checkpoint's parameters depend on: `model_config_to_dict` without the runtime and
    without `fp8` (which changes how the GEMMs round, not what is stored)."""
    out = model_config_to_dict(config)
    del out["runtime"], out["fp8"]
    return out


def replace_model(config: ModelConfig, **changes: Any) -> ModelConfig:
    """`config` with some fields replaced, validated (runtime fields: `with_runtime`)."""
    return replace(config, **changes)


def with_runtime(config: ModelConfig, **changes: Any) -> ModelConfig:
    """`config` with some runtime fields replaced (e.g. `moe_impl="dense"`), validated."""
    return replace(config, runtime=replace(config.runtime, **changes))
