"""The memory plan (`python -m mimo_jax.plan`) and the launcher's check of it."""

import subprocess
import sys

import pytest

from configs import mimo_v2_flash, tiny
from launch import jobs
from mimo_jax.config import GA, model_config_from_dict
from mimo_jax.inference.decode_plan import plan_decode
from mimo_jax.parallel import mesh_config_from_dict
from mimo_jax.parallel.memory import GIB, parse_slice
from mimo_jax.train.memory_plan import plan_for_config

FULL_MODEL_PARAMS = 309.0e9  # SPEC.md, MTP head excluded (~0.33B more)


def _full_config(**train):
    config = mimo_v2_flash.get_config()
    config.model.runtime.moe_impl = "expert_parallel"
    config.train.update(train)
    return config


def test_full_model_fits_v5p_512_with_fsdp_and_experts_in_bf16():
    plan, table = plan_for_config(_full_config(grad_accum_steps=16), "v5p-512",
                                  param_dtype="bfloat16")
    rows = {row.name: row.bytes for row in plan.rows}
    assert plan.axis_sizes["expert"] == 16 and plan.axis_sizes["fsdp"] == 8
    # Every weight is split 256 ways: bf16 params ~ 2 bytes x 309.3B / 256 per device, and the
    # two float32 Adam moments 4x that.
    per_device = 2 * (FULL_MODEL_PARAMS + 0.33e9) / 256
    assert abs(rows["params"] / per_device - 1) < 0.02
    assert abs(rows["optimizer state"] / (4 * rows["params"]) - 1) < 0.01
    assert plan.fits and plan.total < 80 * GIB
    assert "fits: " in table and "v5p-512" in table
    assert "expert capacity: factor 1.25 may drop token copies" in table
    assert "never drops at factor 0 or >= E/k = 32" in table


@pytest.mark.parametrize("remat", ["full", "none"])
def test_fp8_moves_only_what_its_gemms_keep(remat):
    """FP8 keeps q/k/v and dense-FFN GEMM inputs at ~1 byte: the working set and the MTP blocks
    shrink under every policy, the saved row only without remat; the rest does not move."""
    rows = {}
    for fp8 in (False, True):
        config = _full_config(grad_accum_steps=16)
        config.model.fp8 = fp8
        config.model.runtime.remat_policy = remat
        plan, table = plan_for_config(config, "v5p-512")
        rows[fp8] = {row.name: row.bytes for row in plan.rows}
        assert ("FP8 GEMMs" in table) == fp8 and ("fp8: " in table) == fp8
    for name in ("params", "optimizer state", "gradients", "activations: heads"):
        assert rows[True][name] == rows[False][name]
    for name in ("activations: working", "activations: MTP blocks"):
        assert rows[True][name] < rows[False][name]
    saved_true, saved_false = rows[True]["activations: saved"], rows[False]["activations: saved"]
    assert saved_true < saved_false if remat == "none" else saved_true == saved_false


def test_a_full_batch_without_micro_batches_does_not_fit():
    plan, table = plan_for_config(_full_config(grad_accum_steps=1), "v5p-512",
                                  param_dtype="bfloat16")
    assert not plan.fits and "does NOT fit" in table
    assert plan.tokens_per_device == 2048 * 32768 // 256


def test_slice_names():
    assert parse_slice("v5p-512").num_devices == 256
    assert parse_slice("2xv5p-256").num_slices == 2
    assert parse_slice("v6e-256").hbm_bytes == 32 * GIB
    assert parse_slice("64xH200").num_slices == 8
    with pytest.raises(ValueError, match="tpu9"):
        parse_slice("tpu9-8")


def test_decode_plan_of_the_full_model_on_v5p_64():
    """bf16 weights split 32 ways; the KV cache of one row per batch shard at 32k and 256k is
    that of the global layers (4 KV heads of 192 + 128 dims, 2 bytes) plus small rings; 256 rows
    at 256k do not fit."""
    config = mimo_v2_flash.get_config()
    model_config = model_config_from_dict(config.model)
    plan = plan_decode(model_config, mesh_config_from_dict(config.mesh), parse_slice("v5p-64"))
    assert plan.batch == 16 and plan.rows_per_device == 1  # rows over expert=16, not context
    assert abs(plan.weight_bytes / (FULL_MODEL_PARAMS * 2 / 32) - 1) < 0.02
    full = model_config.attention(GA)
    global_layers = model_config.layer_types.count(GA)
    for length in (32_768, 262_144):
        expected = global_layers * length * full.num_kv_heads * (
            full.qk_head_dim + full.v_head_dim) * 2
        assert 1.0 <= plan.cache_bytes[length] / expected < 1.05, length
        assert plan.fits(length)
    crowded = plan_decode(model_config, mesh_config_from_dict(config.mesh),
                          parse_slice("v5p-64"), batch=256)
    assert crowded.rows_per_device == 16
    assert crowded.fits(32_768) and not crowded.fits(262_144)


def test_plan_command_line():
    out = subprocess.run(
        [sys.executable, "-m", "mimo_jax.plan", "--config", "configs/tiny.py", "--mesh",
         "8xH100"], capture_output=True, text=True, timeout=120, check=True).stdout
    assert "slice 8xH100: 8 devices" in out and "fits" in out
    out = subprocess.run(
        [sys.executable, "-m", "mimo_jax.plan", "--mode", "decode", "--config",
         "configs/mimo_v2_flash.py", "--mesh", "v5p-64", "--batch", "256"],
        capture_output=True, text=True, timeout=120, check=True).stdout
    assert "batch 256 rows, 16 per device" in out
    assert "KV cache at 262,144" in out and "does NOT fit" in out


def test_memory_check_refuses_a_run_that_does_not_fit():
    # the full config fits only with its 16 micro-batches; one micro-batch does not:
    with pytest.raises(jobs.DoesNotFit, match="does not fit v5p-512"):
        jobs.check_memory(_full_config(grad_accum_steps=1), "v5p-512", "bfloat16")
    assert "fits" in jobs.check_memory(tiny.get_config(), "8xH100")
