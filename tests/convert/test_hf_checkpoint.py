"""hf.save / hf.load: exact round trips, the tensor layout, hub names, and checkpoint errors."""

import json
import os

import jax
import ml_dtypes
import numpy as np
import pytest
from flax import traverse_util

from mimo_jax.convert import hf
from mimo_jax.convert.errors import CheckpointError
from mimo_jax.model import layout


@pytest.fixture(scope="module")
def saved(tiny_config, tiny_params, tmp_path_factory):
    """The tiny params saved once (float32, sharded small to exercise the index)."""
    directory = str(tmp_path_factory.mktemp("tiny_hf"))
    files = hf.save(tiny_config, tiny_params, directory, max_shard_bytes=300_000)
    assert len(files) > 1
    return directory


def _flat(params):
    return {"/".join(k): np.asarray(v) for k, v in traverse_util.flatten_dict(params).items()}


def _assert_same(a, b):
    flat_a, flat_b = _flat(a), _flat(b)
    assert sorted(flat_a) == sorted(flat_b)
    for key, value in flat_a.items():
        assert flat_b[key].dtype == value.dtype, key
        np.testing.assert_array_equal(flat_b[key], value, err_msg=key)


def _copy_with(src, dst, read_all, write_all, edit, config_edit=None):
    tensors = read_all(src)
    edit(tensors)
    os.makedirs(dst, exist_ok=True)
    write_all(dst, tensors)
    with open(os.path.join(src, "config.json")) as f:
        config = json.load(f)
    if config_edit:
        config = config_edit(config)
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(config, f)
    return dst


def test_round_trip_is_exact(tiny_config, tiny_params, saved):
    model, params = hf.load(saved, attention_impl="reference")
    assert model.config.num_mtp_heads == 2 and model.config.scan_layers
    _assert_same(tiny_params, params)
    _, unscanned = hf.load(saved, scan_layers=False)
    per_layer = layout.unstack_layers(params["decoder"], model.config)
    for i, layer in enumerate(per_layer):
        for key, value in _flat(layer).items():
            np.testing.assert_array_equal(_flat(unscanned["decoder"][f"layer_{i}"])[key], value)


def test_saved_tensor_layout(tiny_config, tiny_params, saved, read_all):
    tensors = read_all(saved)
    d = tiny_config.hidden_size
    n, h, v = tiny_config.sliding.num_heads, tiny_config.sliding.qk_head_dim, tiny_config.sliding.v_head_dim
    run = tiny_params["decoder"]["run_1"]  # layers 1-2: SWA + MoE
    np.testing.assert_array_equal(tensors["model.layers.2.self_attn.q_proj.weight"],
                                  np.asarray(run["attention"]["q_proj"][1]).reshape(d, n * h).T)
    np.testing.assert_array_equal(tensors["model.layers.2.self_attn.o_proj.weight"],
                                  np.asarray(run["attention"]["o_proj"][1]).reshape(n * v, d).T)
    np.testing.assert_array_equal(tensors["model.layers.1.self_attn.attention_sink_bias"],
                                  np.asarray(run["attention"]["sinks"][0]))
    np.testing.assert_array_equal(tensors["model.layers.1.mlp.experts.3.down_proj.weight"],
                                  np.asarray(run["moe"]["down"][0, 3]).T)
    assert tensors["model.layers.1.mlp.gate.weight"].shape == (tiny_config.num_experts, d)
    mtp = tiny_params["mtp_1"]
    np.testing.assert_array_equal(tensors["model.mtp.layers.1.eh_proj.weight"],
                                  np.asarray(mtp["eh_proj"]).T)  # [D, 2D]: embedding half first
    np.testing.assert_array_equal(tensors["model.mtp.layers.1.enorm.weight"],
                                  np.asarray(mtp["token_norm"]["scale"]))
    np.testing.assert_array_equal(tensors["model.mtp.layers.1.hnorm.weight"],
                                  np.asarray(mtp["hidden_norm"]["scale"]))
    np.testing.assert_array_equal(tensors["model.mtp.layers.1.pre_mlp_layernorm.weight"],
                                  np.asarray(mtp["post_attention_norm"]["scale"]))
    np.testing.assert_array_equal(tensors["model.mtp.layers.1.final_layernorm.weight"],
                                  np.asarray(mtp["final_norm"]["scale"]))
    assert "model.mtp.layers.0.self_attn.attention_sink_bias" in tensors
    assert not any("sinks" in name or "gate_up_proj" in name for name in tensors)


def test_bfloat16_export_keeps_router_in_float32(tiny_config, tiny_params, tmp_path, read_all):
    hf.save(tiny_config, tiny_params, str(tmp_path), dtype="bfloat16")
    tensors = read_all(str(tmp_path))
    assert tensors["model.layers.1.self_attn.q_proj.weight"].dtype == ml_dtypes.bfloat16
    assert tensors["model.layers.1.mlp.gate.weight"].dtype == np.float32
    assert tensors["model.layers.1.mlp.gate.e_score_correction_bias"].dtype == np.float32
    with open(tmp_path / "config.json") as f:
        assert json.load(f)["dtype"] == "bfloat16"
    model, params = hf.load(str(tmp_path))
    assert model.config.param_dtype == "bfloat16"
    assert params["decoder"]["run_1"]["moe"]["router"].dtype == np.float32


def _to_hub_config(config):
    """The same model spelled with the released checkpoint's keys."""
    layers = config.pop("layer_types")
    mlps = config.pop("mlp_layer_types")
    rope = config.pop("rope_parameters")
    window = config.pop("sliding_window")
    config.update(
        hybrid_layer_pattern=[int(t == "sliding_attention") for t in layers],
        moe_layer_freq=[int(t == "sparse") for t in mlps], sliding_window_size=window - 1,
        swa_num_attention_heads=config["num_attention_heads"],
        swa_num_key_value_heads=2 * config["num_key_value_heads"],
        swa_head_dim=config["head_dim"], swa_v_head_dim=config["v_head_dim"],
        rope_theta=rope["full_attention"]["rope_theta"],
        swa_rope_theta=rope["sliding_attention"]["rope_theta"],
        partial_rotary_factor=rope["full_attention"]["partial_rotary_factor"],
        add_swa_attention_sink_bias=True, add_full_attention_sink_bias=False,
        layernorm_epsilon=config.pop("rms_norm_eps"), routed_scaling_factor=None)
    config.pop("num_nextn_predict_layers")  # the count comes from the tensor names
    return config


def test_hub_config_and_alternative_names_load_the_same(tiny_params, saved, tmp_path, read_all,
                                                        write_all):
    def rename(tensors):
        for name in list(tensors):
            if name.endswith("attention_sink_bias"):
                tensors[name.replace("attention_sink_bias", "sinks")] = tensors.pop(name)
            if name.endswith("pre_mlp_layernorm.weight"):
                tensors[name.replace("pre_mlp", "post_attention")] = tensors.pop(name)
        tensors["model.rotary_emb.sliding_attention_inv_freq"] = np.ones(8, np.float32)
    directory = _copy_with(saved, str(tmp_path / "hub"), read_all, write_all, rename,
                           _to_hub_config)
    model, params = hf.load(directory)
    assert model.config.num_mtp_heads == 2 and model.config.value_scale == 0.707
    _assert_same(tiny_params, params)


def test_shardings_place_each_parameter(saved):
    mesh = jax.make_mesh((8,), ("model",), axis_types=(jax.sharding.AxisType.Auto,))
    by_vocab = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("model", None))
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    specs = hf.abstract_params(hf.read_config(saved))
    shardings = jax.tree.map(lambda _: replicated, specs)
    shardings["embed"]["embedding"] = by_vocab
    _, params = hf.load(saved, shardings=shardings)
    assert params["embed"]["embedding"].sharding == by_vocab
    assert params["lm_head"]["kernel"].sharding == replicated


def test_num_mtp_heads_override_drops_heads(saved):
    model, params = hf.load(saved, num_mtp_heads=0)
    assert model.config.num_mtp_heads == 0 and not any(k.startswith("mtp_") for k in params)


@pytest.mark.parametrize("edit,match", [
    (lambda t: t.pop("model.layers.2.self_attn.k_proj.weight"),
     r"missing tensor 'model.layers.2.self_attn.k_proj.weight'"),
    (lambda t: t.pop("model.layers.3.mlp.experts.2.up_proj.weight"),
     r"missing tensor 'model.layers.3.mlp.experts.2.up_proj.weight'"),
    (lambda t: t.pop("model.mtp.layers.1.hnorm.weight"), r"missing tensor 'model.mtp.layers.1.hnorm"),
    (lambda t: t.update({"model.layers.1.self_attn.q_proj.weight": np.zeros((193, 64), np.float32)}),
     r"'model.layers.1.self_attn.q_proj.weight' has shape \(193, 64\) but the config needs "
     r"\(192, 64\)"),
    (lambda t: t.update({"model.norm.weight": np.zeros((64,), np.int32)}),
     r"'model.norm.weight' has dtype I32, which cannot hold weights"),
    (lambda t: t.update({"model.layers.0.mlp.up_proj.weight": t[
        "model.layers.0.mlp.up_proj.weight"].astype(ml_dtypes.float8_e4m3fn)}),
     r"'model.layers.0.mlp.up_proj.weight' is F8_E4M3 but .* no "
     r"'model.layers.0.mlp.up_proj.weight_scale_inv'"),
    (lambda t: t.update({"model.layers.7.mlp.gate_proj.weight": np.zeros((2, 2), np.float32)}),
     r"1 checkpoint tensor\(s\) match no parameter.*'model.layers.7.mlp.gate_proj.weight'"),
])
def test_malformed_checkpoints_fail_naming_the_tensor(saved, tmp_path, read_all, write_all, edit,
                                                      match):
    directory = _copy_with(saved, str(tmp_path / "bad"), read_all, write_all, edit)
    with pytest.raises(CheckpointError, match=match):
        hf.load(directory)


def test_unexpected_tensor_allowed_when_not_strict(saved, tmp_path, read_all, write_all):
    directory = _copy_with(saved, str(tmp_path / "extra"), read_all, write_all,
                           lambda t: t.update({"extra.weight": np.zeros(3, np.float32)}))
    hf.load(directory, strict=False)


def test_bad_config_fails_naming_the_key(saved, tmp_path, read_all, write_all):
    directory = _copy_with(saved, str(tmp_path / "cfg"), read_all, write_all, lambda t: None,
                           lambda c: dict(c, scoring_func="softmax"))
    with pytest.raises(CheckpointError, match=r"'scoring_func' = 'softmax'"):
        hf.load(directory)
    os.remove(os.path.join(directory, "config.json"))
    with pytest.raises(CheckpointError, match="no config.json"):
        hf.load(directory)


def test_save_rejects_params_that_do_not_fit_the_config(tiny_config, tiny_params, tmp_path):
    import dataclasses
    bigger = dataclasses.replace(tiny_config, vocab_size=300)
    with pytest.raises(CheckpointError, match=r"'embed/embedding' has shape \(256, 64\) but the "
                                              r"config needs \(300, 64\)"):
        hf.save(bigger, tiny_params, str(tmp_path))
