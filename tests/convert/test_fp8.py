"""FP8 e4m3 block-scale dequantisation, alone and inside a crafted checkpoint."""

import dataclasses
import json
import math
import os

import ml_dtypes
import numpy as np
import pytest

from mimo_jax.config import replace_model
from mimo_jax.convert import fp8, hf
from mimo_jax.convert.errors import CheckpointError

BLOCK = 128


def _quantise(weight: np.ndarray):
    """Per-128x128-block absmax scaling into float8_e4m3fn (edge blocks are partial)."""
    rows, cols = weight.shape
    scale = np.zeros((math.ceil(rows / BLOCK), math.ceil(cols / BLOCK)), np.float32)
    quantised = np.zeros(weight.shape, ml_dtypes.float8_e4m3fn)
    for bi in range(scale.shape[0]):
        for bj in range(scale.shape[1]):
            block = weight[bi * BLOCK:(bi + 1) * BLOCK, bj * BLOCK:(bj + 1) * BLOCK]
            scale[bi, bj] = max(np.abs(block).max(), 1e-12) / 448.0
            quantised[bi * BLOCK:(bi + 1) * BLOCK, bj * BLOCK:(bj + 1) * BLOCK] = (
                block / scale[bi, bj]).astype(ml_dtypes.float8_e4m3fn)
    return quantised, scale


def _dequantise_elementwise(quantised: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """The definition, one element at a time: w[i, j] = q[i, j] * scale[i // 128, j // 128]."""
    out = np.zeros(quantised.shape, np.float32)
    for i in range(quantised.shape[0]):
        for j in range(quantised.shape[1]):
            out[i, j] = np.float32(quantised[i, j]) * scale[i // BLOCK, j // BLOCK]
    return out


def _dequantise_blockwise(quantised: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """The same, one 128x128 block at a time."""
    out = np.zeros(quantised.shape, np.float32)
    for bi in range(scale.shape[0]):
        for bj in range(scale.shape[1]):
            block = (slice(bi * BLOCK, (bi + 1) * BLOCK), slice(bj * BLOCK, (bj + 1) * BLOCK))
            out[block] = quantised[block].astype(np.float32) * scale[bi, bj]
    return out


def test_dequantize_matches_elementwise_definition():
    rng = np.random.default_rng(0)
    weight = rng.normal(0, 0.05, (300, 200)).astype(np.float32)  # 3x2 blocks, both edges partial
    quantised, scale = _quantise(weight)
    got = fp8.dequantize(quantised, scale, (BLOCK, BLOCK))
    np.testing.assert_array_equal(got, _dequantise_elementwise(quantised, scale))
    np.testing.assert_array_equal(got, _dequantise_blockwise(quantised, scale))
    np.testing.assert_allclose(got, weight, atol=0.07 * np.abs(weight).max())
    stacked = np.stack([quantised, quantised[::-1]])  # a fused [E, R, C] tensor
    scales = np.stack([scale, scale * 2])
    got3 = fp8.dequantize(stacked, scales, (BLOCK, BLOCK))
    np.testing.assert_array_equal(got3[1], fp8.dequantize(quantised[::-1], scale * 2, (BLOCK, BLOCK)))


def test_bad_scale_shape_names_tensor_and_shapes():
    with pytest.raises(CheckpointError, match=r"'w'_scale_inv has shape \(2, 2\).*needs \(3, 2\)"):
        fp8.dequantize(np.zeros((300, 200), ml_dtypes.float8_e4m3fn), np.ones((2, 2)),
                       (BLOCK, BLOCK), "w")


def _quantised_name(name: str) -> bool:
    # The release keeps embeddings, LM head, o_proj, norms and the router in bf16/fp32.
    return name.endswith("proj.weight") and "o_proj" not in name


def test_fp8_checkpoint_dequantised_on_load(tiny_config, random_params, tmp_path, read_all,
                                           write_all):
    # Dims that are not multiples of 128: 136 hidden, 200 dense, 72 expert, 2 x 96 q/k.
    config = replace_model(
        tiny_config, hidden_size=136, dense_intermediate_size=200, moe_intermediate_size=72,
        num_mtp_heads=1,
        sliding=dataclasses.replace(tiny_config.sliding, num_heads=2, num_kv_heads=2,
                                    qk_head_dim=96, v_head_dim=40, rope_dim=32),
        full=dataclasses.replace(tiny_config.full, num_heads=2, num_kv_heads=1, qk_head_dim=96,
                                 v_head_dim=40, rope_dim=32))
    params = random_params(config, seed=3)
    hf.save(config, params, str(tmp_path / "plain"))
    tensors = read_all(str(tmp_path / "plain"))
    expected, fp8_tensors = {}, {}
    for name, value in tensors.items():
        if _quantised_name(name):
            quantised, scale = _quantise(value)
            fp8_tensors[name], fp8_tensors[name + "_scale_inv"] = quantised, scale
            expected[name] = _dequantise_blockwise(quantised, scale)
        else:
            fp8_tensors[name] = value.astype(ml_dtypes.bfloat16) if value.ndim == 2 and (
                "mlp.gate.weight" not in name) else value
            expected[name] = fp8_tensors[name].astype(np.float32)
    multi_block = [n for n in fp8_tensors if n.endswith("_scale_inv") and
                   min(fp8_tensors[n].shape) > 1]
    assert multi_block  # e.g. the dense 200x136 projections span 2x2 blocks with partial edges
    os.makedirs(tmp_path / "fp8")
    write_all(str(tmp_path / "fp8"), fp8_tensors)
    with open(tmp_path / "plain" / "config.json") as f:
        hf_cfg = json.load(f)
    hf_cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3",
                                     "activation_scheme": "dynamic",
                                     "weight_block_size": [BLOCK, BLOCK]}
    with open(tmp_path / "fp8" / "config.json", "w") as f:
        json.dump(hf_cfg, f)
    model, loaded = hf.load(str(tmp_path / "fp8"), param_dtype="float32", dtype="float32")
    assert model.config.num_mtp_heads == 1
    # Back out in float32 and compare every tensor with the element-wise dequantisation.
    hf.save(model.config, loaded, str(tmp_path / "out"))
    written = read_all(str(tmp_path / "out"))
    assert sorted(written) == sorted(expected)
    for name, value in written.items():
        np.testing.assert_array_equal(value, expected[name], err_msg=name)


def test_fp8_export_quantises_what_the_release_does(tiny_config, random_params, tmp_path,
                                                    read_all):
    """hf.save(fp8_block=...) writes the release's FP8 tensors as the block-absmax reference
    quantises them (bit for bit), the rest unquantised, and hf.load reads it back."""
    config = replace_model(tiny_config, hidden_size=136, dense_intermediate_size=200,
                           num_mtp_heads=1)
    params = random_params(config, seed=5)
    hf.save(config, params, str(tmp_path / "plain"))
    plain = read_all(str(tmp_path / "plain"))
    hf.save(config, params, str(tmp_path / "fp8"), fp8_block=(BLOCK, BLOCK),
            max_shard_bytes=200_000)
    written = read_all(str(tmp_path / "fp8"))
    quantised = sorted(n for n in plain if _quantised_name(n))
    assert any(".mtp." in n for n in quantised) and any(".experts." in n for n in quantised)
    assert sorted(written) == sorted(list(plain) + [n + "_scale_inv" for n in quantised])
    expected = {}
    for name, value in plain.items():
        if name in quantised:
            want, want_scale = _quantise(value)
            assert written[name].dtype == ml_dtypes.float8_e4m3fn, name
            np.testing.assert_array_equal(written[name].astype(np.float32),
                                          want.astype(np.float32), err_msg=name)
            np.testing.assert_array_equal(written[name + "_scale_inv"], want_scale, err_msg=name)
            expected[name] = _dequantise_blockwise(want, want_scale)
        else:
            np.testing.assert_array_equal(written[name], value, err_msg=name)
            expected[name] = value
    with open(tmp_path / "fp8" / "config.json") as f:
        assert json.load(f)["quantization_config"]["weight_block_size"] == [BLOCK, BLOCK]
    model, loaded = hf.load(str(tmp_path / "fp8"), param_dtype="float32", dtype="float32")
    hf.save(model.config, loaded, str(tmp_path / "out"))
    for name, value in read_all(str(tmp_path / "out")).items():
        np.testing.assert_array_equal(value, expected[name], err_msg=name)


def test_fp8_export_rejects_a_bad_block(tiny_config, random_params, tmp_path):
    with pytest.raises(ValueError, match=r"fp8_block must be two positive integers, got \(128,\)"):
        hf.save(tiny_config, random_params(tiny_config), str(tmp_path), fp8_block=(128,))
