"""Frozen, validated run configuration built from an `ml_collections.ConfigDict`.

Configs are written as ConfigDicts in `configs/*.py` (so they can be overridden from the command
line); everything downstream reads these frozen dataclasses instead. A bad value fails here, at
start-up, with a `ConfigError` naming the key and the value.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

SWA = "sliding"
GA = "global"
DENSE = "dense"
MOE = "moe"

ATTENTION_IMPLS = ("auto", "reference", "chunked", "pallas")
MOE_IMPLS = ("dense", "ragged", "expert_parallel")
REMAT_POLICIES = ("none", "full", "save_dots", "save_dots_no_batch")
DTYPES = ("float32", "bfloat16", "float16")


class ConfigError(ValueError):
    """A configuration value that cannot work; the message names the key and the value."""


def _fail(key: str, value: Any, why: str) -> None:
    raise ConfigError(f"config key {key!r} = {value!r}: {why}")


@dataclasses.dataclass(frozen=True)
class AttentionConfig:
    """One attention layer type (sliding-window or global).

    `sliding_window` counts the keys a query sees, itself included: W=129 means the query and the
    128 tokens before it (the reference's `sliding_window_size=128`). None means full causal.
    """

    num_heads: int
    num_kv_heads: int
    qk_head_dim: int
    v_head_dim: int
    rope_dim: int
    rope_theta: float
    sliding_window: int | None
    attention_sink: bool

    def validate(self, prefix: str) -> None:
        for name in ("num_heads", "num_kv_heads", "qk_head_dim", "v_head_dim"):
            if getattr(self, name) < 1:
                _fail(f"{prefix}.{name}", getattr(self, name), "must be >= 1")
        if self.num_heads % self.num_kv_heads:
            _fail(f"{prefix}.num_kv_heads", self.num_kv_heads,
                  f"must divide {prefix}.num_heads={self.num_heads}")
        if self.rope_dim < 0 or self.rope_dim > self.qk_head_dim or self.rope_dim % 2:
            _fail(f"{prefix}.rope_dim", self.rope_dim,
                  f"must be even and in [0, qk_head_dim={self.qk_head_dim}]")
        if self.rope_theta <= 0:
            _fail(f"{prefix}.rope_theta", self.rope_theta, "must be > 0")
        if self.sliding_window is not None and self.sliding_window < 1:
            _fail(f"{prefix}.sliding_window", self.sliding_window, "must be >= 1 (or None)")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture of MiMo-V2-Flash and its scaled-down relatives. SPEC.md has the numbers."""

    vocab_size: int
    hidden_size: int
    num_layers: int
    layer_types: tuple[str, ...]  # per layer: "sliding" | "global"
    mlp_types: tuple[str, ...]  # per layer: "dense" | "moe"
    sliding: AttentionConfig
    full: AttentionConfig
    value_scale: float
    dense_intermediate_size: int
    moe_intermediate_size: int
    num_experts: int
    num_experts_per_token: int
    routed_scaling_factor: float
    norm_eps: float
    init_std: float
    num_mtp_heads: int
    param_dtype: str
    dtype: str
    attention_impl: str
    attention_chunk_size: int
    moe_impl: str
    scan_layers: bool
    remat_policy: str

    @property
    def moe_layers(self) -> tuple[int, ...]:
        return tuple(i for i, t in enumerate(self.mlp_types) if t == MOE)

    def attention(self, layer_type: str) -> AttentionConfig:
        return self.sliding if layer_type == SWA else self.full

    def validate(self) -> "ModelConfig":
        for name in ("vocab_size", "hidden_size", "num_layers", "dense_intermediate_size",
                     "moe_intermediate_size", "num_experts", "num_experts_per_token"):
            if getattr(self, name) < 1:
                _fail(f"model.{name}", getattr(self, name), "must be >= 1")
        if self.num_experts_per_token > self.num_experts:
            _fail("model.num_experts_per_token", self.num_experts_per_token,
                  f"top-k cannot exceed model.num_experts={self.num_experts}")
        for key, seq, allowed in (("model.layer_types", self.layer_types, (SWA, GA)),
                                  ("model.mlp_types", self.mlp_types, (DENSE, MOE))):
            if len(seq) != self.num_layers:
                _fail(key, seq, f"has {len(seq)} entries but model.num_layers={self.num_layers}")
            bad = [t for t in seq if t not in allowed]
            if bad:
                _fail(key, seq, f"entries must be in {allowed}, got {bad[0]!r}")
        self.sliding.validate("model.sliding")
        self.full.validate("model.full")
        if self.sliding.qk_head_dim != self.full.qk_head_dim or (
                self.sliding.v_head_dim != self.full.v_head_dim):
            # The MTP heads and the KV-cache layout assume one head geometry.
            _fail("model.full.qk_head_dim", self.full.qk_head_dim,
                  "sliding and global layers must share qk/v head dims")
        if self.num_mtp_heads < 0:
            _fail("model.num_mtp_heads", self.num_mtp_heads, "must be >= 0")
        if self.norm_eps <= 0:
            _fail("model.norm_eps", self.norm_eps, "must be > 0")
        if self.init_std <= 0:
            _fail("model.init_std", self.init_std, "must be > 0")
        for key in ("param_dtype", "dtype"):
            if getattr(self, key) not in DTYPES:
                _fail(f"model.{key}", getattr(self, key), f"must be one of {DTYPES}")
        if self.attention_impl not in ATTENTION_IMPLS:
            _fail("model.attention_impl", self.attention_impl, f"must be one of {ATTENTION_IMPLS}")
        if self.attention_chunk_size < 1:
            _fail("model.attention_chunk_size", self.attention_chunk_size, "must be >= 1")
        if self.moe_impl not in MOE_IMPLS:
            _fail("model.moe_impl", self.moe_impl, f"must be one of {MOE_IMPLS}")
        if self.remat_policy not in REMAT_POLICIES:
            _fail("model.remat_policy", self.remat_policy, f"must be one of {REMAT_POLICIES}")
        return self


def default_layer_types(num_layers: int, global_period: int) -> tuple[str, ...]:
    """Layer 0 and every `global_period`-th layer after it are global: `i == 0 or (i+1) % p == 0`."""
    return tuple(GA if i == 0 or (i + 1) % global_period == 0 else SWA for i in range(num_layers))


def default_mlp_types(num_layers: int, num_dense_layers: int) -> tuple[str, ...]:
    """The first `num_dense_layers` layers use a dense SwiGLU, the rest MoE."""
    return tuple(DENSE if i < num_dense_layers else MOE for i in range(num_layers))


def _get(cfg: Mapping[str, Any], key: str, prefix: str) -> Any:
    if key not in cfg:
        raise ConfigError(f"config key {prefix}.{key!r} is missing")
    return cfg[key]


def _parse_types(value: Any, key: str) -> tuple[str, ...] | None:
    if value is None or value == "":
        return None
    if isinstance(value, str):
        value = [v.strip() for v in value.split(",") if v.strip()]
    if not isinstance(value, (list, tuple)):
        _fail(key, value, "must be a list of names or a comma-separated string")
    return tuple(value)


def _attention_config(cfg: Mapping[str, Any], prefix: str) -> AttentionConfig:
    window = _get(cfg, "sliding_window", prefix)
    return AttentionConfig(
        num_heads=int(_get(cfg, "num_heads", prefix)),
        num_kv_heads=int(_get(cfg, "num_kv_heads", prefix)),
        qk_head_dim=int(_get(cfg, "qk_head_dim", prefix)),
        v_head_dim=int(_get(cfg, "v_head_dim", prefix)),
        rope_dim=int(_get(cfg, "rope_dim", prefix)),
        rope_theta=float(_get(cfg, "rope_theta", prefix)),
        sliding_window=None if window is None else int(window),
        attention_sink=bool(_get(cfg, "attention_sink", prefix)),
    )


def model_config_from_dict(cfg: Mapping[str, Any]) -> ModelConfig:
    """Builds and validates a `ModelConfig` from the `model` section of a run config."""
    known = {f.name for f in dataclasses.fields(ModelConfig)} | {
        "global_period", "num_dense_layers"}
    for key in cfg.keys():
        if key not in known:
            raise ConfigError(f"config key 'model.{key}' is unknown; known keys: {sorted(known)}")
    num_layers = int(_get(cfg, "num_layers", "model"))
    layer_types = _parse_types(cfg.get("layer_types"), "model.layer_types")
    if layer_types is None:
        period = int(_get(cfg, "global_period", "model"))
        if period < 1:
            _fail("model.global_period", period, "must be >= 1")
        layer_types = default_layer_types(num_layers, period)
    mlp_types = _parse_types(cfg.get("mlp_types"), "model.mlp_types")
    if mlp_types is None:
        num_dense = int(_get(cfg, "num_dense_layers", "model"))
        if not 0 <= num_dense <= num_layers:
            _fail("model.num_dense_layers", num_dense, f"must be in [0, num_layers={num_layers}]")
        mlp_types = default_mlp_types(num_layers, num_dense)
    return ModelConfig(
        vocab_size=int(_get(cfg, "vocab_size", "model")),
        hidden_size=int(_get(cfg, "hidden_size", "model")),
        num_layers=num_layers,
        layer_types=layer_types,
        mlp_types=mlp_types,
        sliding=_attention_config(_get(cfg, "sliding", "model"), "model.sliding"),
        full=_attention_config(_get(cfg, "full", "model"), "model.full"),
        value_scale=float(_get(cfg, "value_scale", "model")),
        dense_intermediate_size=int(_get(cfg, "dense_intermediate_size", "model")),
        moe_intermediate_size=int(_get(cfg, "moe_intermediate_size", "model")),
        num_experts=int(_get(cfg, "num_experts", "model")),
        num_experts_per_token=int(_get(cfg, "num_experts_per_token", "model")),
        routed_scaling_factor=float(_get(cfg, "routed_scaling_factor", "model")),
        norm_eps=float(_get(cfg, "norm_eps", "model")),
        init_std=float(_get(cfg, "init_std", "model")),
        num_mtp_heads=int(_get(cfg, "num_mtp_heads", "model")),
        param_dtype=str(_get(cfg, "param_dtype", "model")),
        dtype=str(_get(cfg, "dtype", "model")),
        attention_impl=str(_get(cfg, "attention_impl", "model")),
        attention_chunk_size=int(_get(cfg, "attention_chunk_size", "model")),
        moe_impl=str(_get(cfg, "moe_impl", "model")),
        scan_layers=bool(_get(cfg, "scan_layers", "model")),
        remat_policy=str(_get(cfg, "remat_policy", "model")),
    ).validate()


def model_config_to_dict(config: ModelConfig) -> dict[str, Any]:
    """The inverse of `model_config_from_dict` (explicit layer/mlp types, no derived keys)."""
    out = dataclasses.asdict(config)
    out["layer_types"] = list(config.layer_types)
    out["mlp_types"] = list(config.mlp_types)
    return out


def replace_model(config: ModelConfig, **changes: Any) -> ModelConfig:
    """`dataclasses.replace` followed by validation."""
    return dataclasses.replace(config, **changes).validate()
