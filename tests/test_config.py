"""Config validation names the bad key and value; the configs carry the report's numbers; every
config section reads back what it writes; runtime choices live apart from the architecture."""

import dataclasses
import json

import pytest

from configs import mimo_v2_flash, tiny
from mimo_jax.config import (ConfigError, GA, SWA, RuntimeConfig, architecture,
                             model_config_from_dict, model_config_to_dict, replace_model,
                             with_runtime)
from mimo_jax.config_reader import read_section, to_dict
from mimo_jax.data.config import DataConfig, data_config_from_dict
from mimo_jax.parallel.config import MeshConfig, mesh_config_from_dict
from mimo_jax.train.config import TrainConfig, train_config_from_dict


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
    ("runtime.attention_impl", "flash", "'model.runtime.attention_impl' = 'flash'"),
    ("sliding.rope_dim", 7, "'model.sliding.rope_dim' = 7"),
    ("runtime.dtype", "float8", "'model.runtime.dtype' = 'float8'"),
    ("runtime.expert_capacity_factor", -1.0,
     "'model.runtime.expert_capacity_factor' = -1.0: must be >= 0 (0 = dropless)"),
    ("runtime.expert_transport", "nccl", "'model.runtime.expert_transport' = 'nccl'"),
    ("num_experts", "many", "'model.num_experts' = 'many': must be an integer"),
    ("scan_layers", "maybe", "'model.scan_layers' = 'maybe': must be true or false"),
])
def test_bad_values_name_key_and_value(key, value, words):
    cfg = _model().to_dict()  # a plain dict: a wrong type is the point of some cases
    section, _, name = key.rpartition(".")
    (cfg[section] if section else cfg)[name] = value
    with pytest.raises(ConfigError) as error:
        model_config_from_dict(cfg)
    assert words in str(error.value)


def test_unknown_key_is_rejected():
    cfg = _model()
    cfg.unlock()
    cfg.num_heads = 8
    with pytest.raises(ConfigError, match=r"'model.num_heads' is unknown; known keys: \[.*'vocab_size'"):
        model_config_from_dict(cfg)
    cfg = _model()
    cfg.unlock()
    cfg.runtime.flash = True
    with pytest.raises(ConfigError, match="'model.runtime.flash' is unknown"):
        model_config_from_dict(cfg)


def test_missing_key_is_named():
    cfg = _model().to_dict()
    del cfg["hidden_size"]
    with pytest.raises(ConfigError, match="config key 'model.hidden_size' is missing"):
        model_config_from_dict(cfg)


@pytest.mark.parametrize("key", ["dtype", "attention_impl", "attention_chunk_size", "moe_impl",
                                 "remat_policy", "expert_capacity_factor", "expert_transport"])
def test_flat_runtime_keys_say_where_they_moved(key):
    cfg = _model().to_dict()
    cfg[key] = cfg["runtime"][key]
    with pytest.raises(ConfigError, match=f"'model.{key}' has moved: set 'model.runtime.{key}'"):
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
    assert config.runtime == RuntimeConfig(
        dtype="bfloat16", attention_impl="auto", attention_chunk_size=128,
        moe_impl="expert_parallel", remat_policy="full", expert_capacity_factor=1.25,
        expert_transport="auto")


def test_tiny_config_has_both_layer_types_and_mtp_heads():
    config = model_config_from_dict(tiny.get_config().model)
    assert set(config.layer_types) == {GA, SWA}
    assert config.num_mtp_heads == 2 and config.num_experts == 16


@pytest.mark.parametrize("cls, section", [
    (TrainConfig, "train"), (DataConfig, "data"), (MeshConfig, "mesh")])
def test_sections_read_back_what_they_write(cls, section):
    config = read_section(cls, mimo_v2_flash.get_config()[section])
    written = json.loads(json.dumps(to_dict(config)))
    assert read_section(cls, written) == config


def test_model_config_reads_back_what_it_writes():
    config = model_config_from_dict(mimo_v2_flash.get_config().model)
    written = json.loads(json.dumps(model_config_to_dict(config)))
    assert written["layer_types"][:2] == [GA, SWA] and written["runtime"]["moe_impl"] == (
        "expert_parallel")
    assert model_config_from_dict(written) == config


def test_sources_and_axis_sizes_are_written_in_their_config_spelling():
    data = data_config_from_dict(dict(train_sources="text:/a/*.txt@0.7,stdlib@0.3", seq_len=8,
                                      batch_size=2))
    assert to_dict(data)["train_sources"] == "text:/a/*.txt@0.7,stdlib@0.3"
    mesh = mesh_config_from_dict(dict(ici="fsdp=-1,expert=8", dcn="data=2"))
    assert (to_dict(mesh)["ici"], to_dict(mesh)["dcn"]) == ("fsdp=-1,expert=8", "data=2")


def test_section_defaults_and_derived_values():
    train = train_config_from_dict(dict(steps=10, learning_rate=3.2e-4))
    assert train.end_learning_rate == pytest.approx(1e-4) and train.keep_last == 3
    assert mesh_config_from_dict(None) == MeshConfig()
    assert dict(MeshConfig().ici)["fsdp"] == -1
    with pytest.raises(ConfigError, match="config key 'train.learning_rate' is missing"):
        train_config_from_dict(dict(steps=10))


def test_architecture_leaves_out_the_runtime():
    config = model_config_from_dict(tiny.get_config().model)
    faster = with_runtime(config, moe_impl="ragged", dtype="bfloat16", remat_policy="full")
    assert faster.runtime.moe_impl == "ragged" and config.runtime.moe_impl == "auto"
    assert architecture(faster) == architecture(config)
    assert "runtime" not in architecture(config) and "scan_layers" in architecture(config)
    assert architecture(replace_model(config, num_mtp_heads=1)) != architecture(config)


def test_fp8_switch_reads_old_configs_and_leaves_the_architecture():
    config = model_config_from_dict(tiny.get_config().model)
    assert not config.fp8 and model_config_from_dict(mimo_v2_flash.get_config().model).fp8
    saved = model_config_to_dict(config)
    del saved["fp8"]  # a model_config.json written before the switch existed
    assert model_config_from_dict(json.loads(json.dumps(saved))) == config
    assert architecture(replace_model(config, fp8=True)) == architecture(config)
    assert model_config_from_dict(_model(fp8=True)).fp8
    with pytest.raises(ConfigError, match="'model.fp8' = 'sometimes'"):
        model_config_from_dict({**saved, "fp8": "sometimes"})


def test_replacements_are_validated():
    config = model_config_from_dict(tiny.get_config().model)
    with pytest.raises(ConfigError, match="'model.runtime.moe_impl' = 'fast'"):
        with_runtime(config, moe_impl="fast")
    with pytest.raises(ConfigError, match="'model.moe_impl' has moved"):
        replace_model(config, moe_impl="ragged")
    with pytest.raises(ConfigError, match="'model.num_experts_per_token' = 32"):
        dataclasses.replace(config, num_experts_per_token=32)
    with pytest.raises(ConfigError, match="'model.sliding.num_kv_heads' = 3"):
        replace_model(config, sliding=dataclasses.replace(config.sliding, num_kv_heads=3))
    assert replace_model(config, layer_types=[GA] * 8).layer_types == (GA,) * 8
