"""Hugging Face `config.json` <-> `ModelConfig`.

Two spellings of the same model are read:
  hub form           the released checkpoint's keys (SGLang/vLLM read these): `hybrid_layer_pattern`
                     (1 = SWA, 0 = GA), `moe_layer_freq`, `swa_num_attention_heads`,
                     `swa_num_key_value_heads`, `swa_head_dim`, `swa_v_head_dim`,
                     `sliding_window_size` (keys *before* the query), `rope_theta`/`swa_rope_theta`,
                     `partial_rotary_factor`, `add_swa_attention_sink_bias`, `layernorm_epsilon`...
  transformers form  what `MiMoV2FlashConfig.save_pretrained` writes: `layer_types`,
                     `mlp_layer_types`, `sliding_window` (keys seen, the query included),
                     `rope_parameters` per layer type, `rms_norm_eps`; SWA layers have the GA
                     layers' query heads and twice their KV heads, and always a sink.
Missing keys take transformers' defaults. Settings the model cannot express (softmax routing,
group-limited routing, shared experts, biases, tied embeddings, RoPE scaling...) are rejected with
the key and its value. `to_hf` writes the transformers form.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from mimo_jax.config import (DENSE, DTYPES, GA, MOE, RUNTIME_KEYS, SWA, AttentionConfig,
                             ModelConfig, default_layer_types)
from mimo_jax.config_reader import read_section
from mimo_jax.convert.errors import CheckpointError
from mimo_jax.convert.fp8 import DEFAULT_BLOCK

HF_SWA, HF_GA = "sliding_attention", "full_attention"
HF_DENSE, HF_MOE = "dense", "sparse"
# transformers' defaults for the keys a config may leave out (MiMoV2FlashConfig, 5.24).
DEFAULT_ROPE = {HF_GA: 5_000_000.0, HF_SWA: 10_000.0}
DEFAULT_ROTARY_FACTOR = 0.334
DEFAULT_VALUE_SCALE = 0.707
# Keys that name the number of MTP heads; without one the loader counts `model.mtp.layers.{k}`.
MTP_KEYS = ("num_nextn_predict_layers", "num_mtp_layers", "num_mtp_modules")


def _bad(key: str, value: Any, why: str) -> CheckpointError:
    return CheckpointError(f"config.json key {key!r} = {value!r}: {why}")


def _first(hf: Mapping[str, Any], keys: tuple[str, ...], default: Any) -> Any:
    for key in keys:
        if hf.get(key) is not None:
            return hf[key]
    return default


def _int(hf: Mapping[str, Any], key: str, default: Any = None) -> int:
    value = hf.get(key, default)
    if value is None:
        raise CheckpointError(f"config.json key {key!r} is missing")
    if isinstance(value, bool) or not isinstance(value, int):
        raise _bad(key, value, "must be an integer")
    return value


def _check_model_features(hf: Mapping[str, Any]) -> None:
    """Rejects settings of the reference that this model does not implement."""
    checks = [
        ("hidden_act", "silu", lambda v: v == "silu", "only SwiGLU (silu) is implemented"),
        ("scoring_func", "sigmoid", lambda v: v == "sigmoid", "only the sigmoid router is implemented"),
        ("topk_method", "noaux_tc", lambda v: v in (None, "noaux_tc"),
         "only 'noaux_tc' (top-k of score + correction bias) is implemented"),
        ("norm_topk_prob", True, lambda v: v is True, "top-k weights are always renormalised"),
        ("n_shared_experts", None, lambda v: v in (None, 0), "shared experts are not implemented"),
        ("attention_bias", False, lambda v: not v, "projections have no bias"),
        ("tie_word_embeddings", False, lambda v: not v,
         "the embedding and LM head are separate matrices"),
        ("rope_scaling", None, lambda v: v is None, "RoPE scaling is not implemented"),
    ]
    for key, default, ok, why in checks:
        value = hf.get(key, default)
        if not ok(value):
            raise _bad(key, value, why)
    quantization_block(hf)
    n_group = hf.get("n_group") or 1
    topk_group = hf.get("topk_group") or n_group
    if n_group > 1 and topk_group < n_group:
        raise _bad("topk_group", topk_group,
                   f"group-limited routing (topk_group < n_group={n_group}) is not implemented")


def quantization_block(hf: Mapping[str, Any]) -> tuple[int, int]:
    """The FP8 block shape from `quantization_config` ([128, 128] when absent)."""
    quant = hf.get("quantization_config")
    if not quant:
        return DEFAULT_BLOCK
    method = quant.get("quant_method")
    if method != "fp8":
        raise _bad("quantization_config.quant_method", method, "only 'fp8' is supported")
    fmt = quant.get("fmt", "e4m3")
    if fmt != "e4m3":
        raise _bad("quantization_config.fmt", fmt, "only 'e4m3' is supported")
    block = quant.get("weight_block_size", list(DEFAULT_BLOCK))
    if (not isinstance(block, (list, tuple)) or len(block) != 2
            or not all(isinstance(b, int) and b > 0 for b in block)):
        raise _bad("quantization_config.weight_block_size", block, "must be two positive integers")
    return tuple(block)


def _pattern(hf: Mapping[str, Any], num_layers: int) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Per-layer attention and FFN types from either form."""
    if hf.get("layer_types") is not None:
        key, raw, names = "layer_types", hf["layer_types"], {HF_SWA: SWA, HF_GA: GA}
    elif hf.get("hybrid_layer_pattern") is not None:
        key, raw, names = "hybrid_layer_pattern", hf["hybrid_layer_pattern"], {1: SWA, 0: GA}
    else:
        key, raw, names = None, None, None
    if key is None:
        layer_types = default_layer_types(num_layers, 6)
    else:
        if not isinstance(raw, (list, tuple)) or len(raw) != num_layers:
            raise _bad(key, raw, f"must list one entry per layer (num_hidden_layers={num_layers})")
        bad = [v for v in raw if v not in names]
        if bad:
            raise _bad(key, raw, f"entry {bad[0]!r} is not one of {sorted(names, key=str)}")
        layer_types = tuple(names[v] for v in raw)
    if hf.get("mlp_layer_types") is not None:
        key, raw, names = "mlp_layer_types", hf["mlp_layer_types"], {HF_DENSE: DENSE, HF_MOE: MOE}
    elif hf.get("moe_layer_freq") is not None:
        key, raw, names = "moe_layer_freq", hf["moe_layer_freq"], {1: MOE, 0: DENSE}
    else:
        return layer_types, (DENSE,) + (MOE,) * (num_layers - 1)
    if not isinstance(raw, (list, tuple)) or len(raw) != num_layers:
        raise _bad(key, raw, f"must list one entry per layer (num_hidden_layers={num_layers})")
    bad = [v for v in raw if v not in names or isinstance(v, bool)]
    if bad:
        raise _bad(key, raw, f"entry {bad[0]!r} is not one of {sorted(names, key=str)}")
    return layer_types, tuple(names[v] for v in raw)


def _rope(hf: Mapping[str, Any], hub: bool) -> dict[str, tuple[float, float]]:
    """(theta, partial_rotary_factor) per HF layer type."""
    params = hf.get("rope_parameters")
    if params is not None:
        if not isinstance(params, dict):
            raise _bad("rope_parameters", params, "must be an object")
        per_type = params if (HF_GA in params or HF_SWA in params) else {HF_GA: params,
                                                                         HF_SWA: params}
        out = {}
        for layer_type in (HF_GA, HF_SWA):
            entry = per_type.get(layer_type) or {}
            kind = entry.get("rope_type", "default")
            if kind != "default":
                raise _bad(f"rope_parameters.{layer_type}.rope_type", kind,
                           "only plain RoPE ('default') is implemented")
            out[layer_type] = (float(entry.get("rope_theta", DEFAULT_ROPE[layer_type])),
                               float(entry.get("partial_rotary_factor", DEFAULT_ROTARY_FACTOR)))
        return out
    factor = float(hf.get("partial_rotary_factor", DEFAULT_ROTARY_FACTOR))
    ga_theta = float(hf.get("rope_theta", DEFAULT_ROPE[HF_GA]))
    swa_default = ga_theta if hub and "rope_theta" in hf else DEFAULT_ROPE[HF_SWA]
    return {HF_GA: (ga_theta, factor),
            HF_SWA: (float(hf.get("swa_rope_theta", swa_default)), factor)}


def _rope_dim(head_dim: int, factor: float, key: str) -> int:
    # The reference's rule: int(head_dim * partial_rotary_factor) rotated dims (64 of 192).
    dim = int(head_dim * factor)
    if dim % 2 or not 0 <= dim <= head_dim:
        raise _bad(key, factor, f"gives {dim} rotary dims of head_dim {head_dim}; need an even "
                                "number in [0, head_dim]")
    return dim


def _window(hf: Mapping[str, Any]) -> int:
    # transformers' rule: `sliding_window_size` (keys before the query) wins and gains one.
    if hf.get("sliding_window_size") is not None:
        size = _int(hf, "sliding_window_size")
        if size < 0:
            raise _bad("sliding_window_size", size, "must be >= 0")
        return size + 1
    window = _int(hf, "sliding_window", 129)
    if window < 1:
        raise _bad("sliding_window", window, "must be >= 1")
    return window


def _dtype(hf: Mapping[str, Any]) -> str:
    name = _first(hf, ("dtype", "torch_dtype"), "float32")
    name = str(name).removeprefix("torch.")
    return name if name in DTYPES else "bfloat16"


def is_hub_form(hf: Mapping[str, Any]) -> bool:
    """True for the released checkpoint's spelling (per-type SWA keys, `hybrid_layer_pattern`)."""
    return any(k in hf for k in ("hybrid_layer_pattern", "swa_num_attention_heads",
                                 "swa_num_key_value_heads", "sliding_window_size"))


def from_hf(hf: Mapping[str, Any], detected_mtp_heads: int | None = None,
            **overrides: Any) -> ModelConfig:
    """A validated `ModelConfig` from a parsed `config.json`.

    detected_mtp_heads: the MTP count to use when the config names none
      (`num_nextn_predict_layers`...), e.g. counted from the tensor names; None means 0.
    overrides: any `ModelConfig` field (param_dtype, scan_layers, num_mtp_heads...) or
      `RuntimeConfig` field (dtype, attention_impl, moe_impl...). The runtime is
      `RuntimeConfig`'s defaults with the checkpoint's dtype; the layers are scanned.
    """
    _check_model_features(hf)
    hub = is_hub_form(hf)
    num_layers = _int(hf, "num_hidden_layers", 48)
    layer_types, mlp_types = _pattern(hf, num_layers)
    rope = _rope(hf, hub)
    num_heads = _int(hf, "num_attention_heads", 64)
    num_kv = _int(hf, "num_key_value_heads", 4)
    head_dim = _int(hf, "head_dim", 192)
    v_head_dim = _int(hf, "v_head_dim", 128)
    if hub:
        swa_heads = _int(hf, "swa_num_attention_heads", num_heads)
        swa_kv = _int(hf, "swa_num_key_value_heads", num_kv)
        swa_head_dim = _int(hf, "swa_head_dim", head_dim)
        swa_v_head_dim = _int(hf, "swa_v_head_dim", v_head_dim)
        swa_sink = bool(hf.get("add_swa_attention_sink_bias", False))
        full_sink = bool(hf.get("add_full_attention_sink_bias", False))
    else:
        # transformers builds SWA layers with 2x the KV heads and a sink, same head dims.
        swa_heads, swa_kv, swa_head_dim, swa_v_head_dim = num_heads, 2 * num_kv, head_dim, v_head_dim
        swa_sink, full_sink = True, False
    sliding = AttentionConfig(
        num_heads=swa_heads, num_kv_heads=swa_kv, qk_head_dim=swa_head_dim,
        v_head_dim=swa_v_head_dim,
        rope_dim=_rope_dim(swa_head_dim, rope[HF_SWA][1], "partial_rotary_factor"),
        rope_theta=rope[HF_SWA][0], sliding_window=_window(hf), attention_sink=swa_sink)
    full = AttentionConfig(
        num_heads=num_heads, num_kv_heads=num_kv, qk_head_dim=head_dim, v_head_dim=v_head_dim,
        rope_dim=_rope_dim(head_dim, rope[HF_GA][1], "partial_rotary_factor"),
        rope_theta=rope[HF_GA][0], sliding_window=None, attention_sink=full_sink)
    if "attention_value_scale" in hf:
        value_scale = hf["attention_value_scale"]
        value_scale = 1.0 if value_scale is None else float(value_scale)
    else:
        value_scale = DEFAULT_VALUE_SCALE
    mtp = _first(hf, MTP_KEYS, None)
    if mtp is None:
        mtp = detected_mtp_heads or 0
    eps_keys = ("layernorm_epsilon", "rms_norm_eps") if hub else ("rms_norm_eps",
                                                                   "layernorm_epsilon")
    dtype = _dtype(hf)
    fields = dict(
        vocab_size=_int(hf, "vocab_size", 152_576),
        hidden_size=_int(hf, "hidden_size", 4096),
        num_layers=num_layers,
        layer_types=layer_types,
        mlp_types=mlp_types,
        sliding=sliding,
        full=full,
        value_scale=value_scale,
        dense_intermediate_size=_int(hf, "intermediate_size", 16_384),
        moe_intermediate_size=_int(hf, "moe_intermediate_size", 2048),
        num_experts=int(_first(hf, ("n_routed_experts", "num_local_experts"), 256)),
        num_experts_per_token=_int(hf, "num_experts_per_tok", 8),
        routed_scaling_factor=float(_first(hf, ("routed_scaling_factor",), 1.0)),
        norm_eps=float(_first(hf, eps_keys, 1e-5)),
        init_std=float(hf.get("initializer_range") or 0.006),
        num_mtp_heads=int(mtp),
        param_dtype=dtype,
        scan_layers=True,
    )
    known = {f.name for f in dataclasses.fields(ModelConfig)} | set(RUNTIME_KEYS)
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise TypeError(f"unknown ModelConfig override(s) {unknown}; known fields: {sorted(known)}")
    overrides = dict(overrides)
    fields["runtime"] = {"dtype": dtype, **{k: overrides.pop(k) for k in RUNTIME_KEYS
                                            if k in overrides}}
    fields.update(overrides)  # `runtime=RuntimeConfig(...)` replaces the whole section
    return read_section(ModelConfig, fields)


def _rotary_factor(rope_dim: int, head_dim: int) -> float:
    """A `partial_rotary_factor` with int(head_dim * factor) == rope_dim, 0.334 when it fits."""
    for factor in (DEFAULT_ROTARY_FACTOR, rope_dim / head_dim, (rope_dim + 0.5) / head_dim):
        if int(head_dim * factor) == rope_dim:
            return factor
    raise CheckpointError(f"no partial_rotary_factor gives rope_dim {rope_dim} of {head_dim}")


def to_hf(config: ModelConfig, dtype: str) -> dict[str, Any]:
    """The transformers-form `config.json` for `config` (stored weights in `dtype`).

    transformers ties the SWA layers' shapes to the GA layers'; a config it cannot express raises
    a `CheckpointError` naming the field.
    """
    swa, ga = config.sliding, config.full
    requirements = [
        ("model.sliding.num_heads", swa.num_heads, swa.num_heads == ga.num_heads,
         f"must equal model.full.num_heads={ga.num_heads}"),
        ("model.sliding.num_kv_heads", swa.num_kv_heads, swa.num_kv_heads == 2 * ga.num_kv_heads,
         f"must be twice model.full.num_kv_heads={ga.num_kv_heads}"),
        ("model.sliding.attention_sink", swa.attention_sink, swa.attention_sink,
         "transformers always gives sliding layers a sink"),
        ("model.full.attention_sink", ga.attention_sink, not ga.attention_sink,
         "transformers has no sink on global layers"),
        ("model.sliding.sliding_window", swa.sliding_window, swa.sliding_window is not None,
         "sliding layers need a window"),
        ("model.full.sliding_window", ga.sliding_window, ga.sliding_window is None,
         "global layers attend to the whole prefix"),
    ]
    for key, value, ok, why in requirements:
        if not ok:
            raise CheckpointError(f"cannot export {key} = {value!r} to transformers: {why}")
    return {
        "architectures": ["MiMoV2FlashForCausalLM"],
        "model_type": "mimo_v2_flash",
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.dense_intermediate_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": ga.num_heads,
        "num_key_value_heads": ga.num_kv_heads,
        "head_dim": ga.qk_head_dim,
        "v_head_dim": ga.v_head_dim,
        "hidden_act": "silu",
        "initializer_range": config.init_std,
        "rms_norm_eps": config.norm_eps,
        "tie_word_embeddings": False,
        "attention_bias": False,
        "rope_parameters": {
            HF_GA: {"rope_type": "default", "rope_theta": ga.rope_theta,
                    "partial_rotary_factor": _rotary_factor(ga.rope_dim, ga.qk_head_dim)},
            HF_SWA: {"rope_type": "default", "rope_theta": swa.rope_theta,
                     "partial_rotary_factor": _rotary_factor(swa.rope_dim, swa.qk_head_dim)},
        },
        "sliding_window": swa.sliding_window,
        "layer_types": [HF_SWA if t == SWA else HF_GA for t in config.layer_types],
        "mlp_layer_types": [HF_MOE if t == MOE else HF_DENSE for t in config.mlp_types],
        "attention_value_scale": config.value_scale,
        "moe_intermediate_size": config.moe_intermediate_size,
        "n_routed_experts": config.num_experts,
        "num_experts_per_tok": config.num_experts_per_token,
        "routed_scaling_factor": config.routed_scaling_factor,
        "n_group": 1,
        "topk_group": 1,
        "norm_topk_prob": True,
        "scoring_func": "sigmoid",
        "topk_method": "noaux_tc",
        "num_nextn_predict_layers": config.num_mtp_heads,
        "dtype": dtype,
    }
