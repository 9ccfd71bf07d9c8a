"""config.json in the released (hub) and the transformers spelling <-> ModelConfig."""

import dataclasses

import pytest
from transformers import MiMoV2FlashConfig

from configs import mimo_v2_flash
from mimo_jax.config import (GA, SWA, RuntimeConfig, architecture, model_config_from_dict,
                             replace_model)
from mimo_jax.convert import hf_config
from mimo_jax.convert.errors import CheckpointError

LAYERS = 48


def _hub_config() -> dict:
    """The released checkpoint's config.json keys (values of the 256k-context release)."""
    return {
        "architectures": ["MiMoV2FlashForCausalLM"], "model_type": "mimo_v2_flash",
        "vocab_size": 152576, "hidden_size": 4096, "intermediate_size": 16384,
        "num_hidden_layers": LAYERS, "num_attention_heads": 64, "num_key_value_heads": 4,
        "head_dim": 192, "v_head_dim": 128, "swa_num_attention_heads": 64,
        "swa_num_key_value_heads": 8, "swa_head_dim": 192, "swa_v_head_dim": 128,
        "hybrid_layer_pattern": [0 if i == 0 or (i + 1) % 6 == 0 else 1 for i in range(LAYERS)],
        "moe_layer_freq": [0] + [1] * (LAYERS - 1),
        "sliding_window_size": 128, "rope_theta": 5_000_000, "swa_rope_theta": 10_000,
        "partial_rotary_factor": 0.334, "attention_value_scale": 0.707,
        "add_swa_attention_sink_bias": True, "add_full_attention_sink_bias": False,
        "layernorm_epsilon": 1e-5, "n_routed_experts": 256, "num_experts_per_tok": 8,
        "moe_intermediate_size": 2048, "n_shared_experts": None, "scoring_func": "sigmoid",
        "topk_method": "noaux_tc", "n_group": 1, "topk_group": 1, "norm_topk_prob": True,
        "routed_scaling_factor": None, "hidden_act": "silu", "attention_bias": False,
        "tie_word_embeddings": False, "torch_dtype": "bfloat16",
        "max_position_embeddings": 262144,
        "quantization_config": {"quant_method": "fp8", "fmt": "e4m3",
                                "activation_scheme": "dynamic", "weight_block_size": [128, 128]},
    }


def _architecture(config):
    """The fields a checkpoint fixes, less the ones config.json does not pin down here (init_std,
    param_dtype, scan_layers)."""
    out = architecture(config)
    for key in ("init_std", "param_dtype", "scan_layers"):
        out.pop(key)
    return out


def _full_model(**changes):
    config = model_config_from_dict(mimo_v2_flash.get_config().model)
    full = dataclasses.replace(config.full, rope_theta=5_000_000.0)
    return replace_model(config, full=full, **changes)


def test_hub_config_reads_as_the_full_model():
    config = hf_config.from_hf(_hub_config(), detected_mtp_heads=3)
    assert _architecture(config) == _architecture(_full_model(num_mtp_heads=3))
    assert config.sliding.sliding_window == 129  # sliding_window_size=128 keys before the query
    assert config.sliding.rope_dim == 64 and config.full.rope_dim == 64
    assert config.layer_types[:6] == (GA, SWA, SWA, SWA, SWA, GA)
    assert config.param_dtype == "bfloat16" and config.scan_layers
    # Runtime: RuntimeConfig's defaults computing in the checkpoint's dtype.
    assert config.runtime == RuntimeConfig(dtype="bfloat16")
    assert hf_config.quantization_block(_hub_config()) == (128, 128)


def test_transformers_config_reads_as_the_full_model():
    hf = MiMoV2FlashConfig().to_dict()
    config = hf_config.from_hf(hf)
    assert _architecture(config) == _architecture(_full_model(num_mtp_heads=0))


def test_overrides_and_mtp_key():
    hub = dict(_hub_config(), num_nextn_predict_layers=2)
    config = hf_config.from_hf(hub, detected_mtp_heads=5, attention_impl="chunked",
                               scan_layers=False, dtype="float32")
    assert (config.num_mtp_heads, config.runtime.attention_impl, config.scan_layers,
            config.runtime.dtype) == (2, "chunked", False, "float32")
    assert hf_config.from_hf(hub, num_mtp_heads=1).num_mtp_heads == 1
    with pytest.raises(TypeError, match="num_layerz"):
        hf_config.from_hf(hub, num_layerz=3)


def test_to_hf_round_trip(tiny_config):
    hf = hf_config.to_hf(tiny_config, "float32")
    assert hf["sliding_window"] == tiny_config.sliding.sliding_window
    assert hf["num_key_value_heads"] * 2 == tiny_config.sliding.num_kv_heads
    MiMoV2FlashConfig.from_dict(hf)  # transformers accepts every key
    back = hf_config.from_hf(hf)
    assert _architecture(back) == _architecture(tiny_config)


def test_to_hf_rejects_what_transformers_cannot_express(tiny_config):
    config = replace_model(tiny_config, sliding=dataclasses.replace(tiny_config.sliding,
                                                                     num_kv_heads=4))
    with pytest.raises(CheckpointError, match=r"model.sliding.num_kv_heads = 4.*twice"):
        hf_config.to_hf(config, "float32")


@pytest.mark.parametrize("changes,match", [
    ({"scoring_func": "softmax"}, r"'scoring_func' = 'softmax'"),
    ({"n_group": 8, "topk_group": 4}, r"'topk_group' = 4: group-limited"),
    ({"n_shared_experts": 1}, r"'n_shared_experts' = 1"),
    ({"topk_method": "greedy"}, r"'topk_method' = 'greedy'"),
    ({"norm_topk_prob": False}, r"'norm_topk_prob' = False"),
    ({"hidden_act": "gelu"}, r"'hidden_act' = 'gelu'"),
    ({"rope_scaling": {"type": "yarn"}}, r"'rope_scaling'"),
    ({"quantization_config": {"quant_method": "gptq"}}, r"quant_method' = 'gptq'"),
    ({"hybrid_layer_pattern": [0, 1]}, r"'hybrid_layer_pattern' = \[0, 1\].*num_hidden_layers=48"),
    ({"moe_layer_freq": [2] * LAYERS}, r"'moe_layer_freq'.*entry 2"),
    ({"partial_rotary_factor": 0.3}, r"'partial_rotary_factor' = 0.3: gives 57 rotary dims"),
    ({"sliding_window_size": -2}, r"'sliding_window_size' = -2"),
    ({"num_attention_heads": "64"}, r"'num_attention_heads' = '64': must be an integer"),
])
def test_unsupported_values_are_rejected_by_name(changes, match):
    with pytest.raises(CheckpointError, match=match):
        hf_config.from_hf(dict(_hub_config(), **changes))


def test_grouped_routing_that_keeps_every_group_is_accepted():
    config = hf_config.from_hf(dict(_hub_config(), n_group=8, topk_group=8))
    assert config.num_experts == 256


def test_rope_parameters_with_other_rope_type_rejected():
    hf = MiMoV2FlashConfig().to_dict()
    hf["rope_parameters"]["full_attention"]["rope_type"] = "yarn"
    with pytest.raises(CheckpointError, match=r"rope_parameters.full_attention.rope_type' = 'yarn'"):
        hf_config.from_hf(hf)
