"""Config validation names the bad key and value; the configs carry the report's numbers."""

import pytest

from configs import mimo_v2_flash, tiny
from mimo_jax.config import ConfigError, GA, SWA, model_config_from_dict


def _model(**changes):
    cfg = tiny.get_config().model
    cfg.update_from_flattened_dict(changes)
    return cfg


@pytest.mark.parametrize("key, value, words", [
    ("sliding.num_kv_heads", 3, "'model.sliding.num_kv_heads' = 3"),
    ("num_experts_per_token", 17, "'model.num_experts_per_token' = 17"),
    ("sliding.sliding_window", 0, "'model.sliding.sliding_window' = 0"),
    ("layer_types", "global,sliding", "'model.layer_types'"),
    ("mlp_types", "dense,moe,moe,moe,moe,moe,moe,mlp", "'mlp'"),
    ("attention_impl", "flash", "'model.attention_impl' = 'flash'"),
    ("sliding.rope_dim", 7, "'model.sliding.rope_dim' = 7"),
    ("dtype", "float8", "'model.dtype' = 'float8'"),
])
def test_bad_values_name_key_and_value(key, value, words):
    with pytest.raises(ConfigError) as error:
        model_config_from_dict(_model(**{key: value}))
    assert words in str(error.value)


def test_unknown_key_is_rejected():
    cfg = _model()
    cfg.unlock()
    cfg.num_heads = 8
    with pytest.raises(ConfigError, match="model.num_heads"):
        model_config_from_dict(cfg)


def test_full_config_matches_the_report():
    config = model_config_from_dict(mimo_v2_flash.get_config().model)
    globals_ = [i for i, t in enumerate(config.layer_types) if t == GA]
    assert globals_ == [0, 5, 11, 17, 23, 29, 35, 41, 47]
    assert config.layer_types.count(SWA) == 39
    assert config.mlp_types[0] == "dense" and set(config.mlp_types[1:]) == {"moe"}
    assert (config.sliding.num_kv_heads, config.full.num_kv_heads) == (8, 4)
    assert config.sliding.sliding_window == 129 and config.full.sliding_window is None
    assert config.sliding.attention_sink and not config.full.attention_sink
    assert (config.sliding.rope_theta, config.full.rope_theta) == (10_000.0, 640_000.0)
    assert (config.num_experts, config.num_experts_per_token) == (256, 8)


def test_tiny_config_has_both_layer_types_and_mtp_heads():
    config = model_config_from_dict(tiny.get_config().model)
    assert set(config.layer_types) == {GA, SWA}
    assert config.num_mtp_heads == 2 and config.num_experts == 16
