"""The whole model under every rule preset on 8 devices: loss and gradients of the sharded step
equal the single-device step (1e-5 relative, float32), and gradients come back in the parameters'
rule shardings.

The single-device reference uses the dense MoE dispatch, plain attention and no remat; the
expert-parallel presets run `moe_impl="expert_parallel"` (all-to-all dispatch), the
context-parallel ones the halo/all-gather attention (the MTP shift and packed documents cross
shard borders), and each preset runs one of the remat policies, so every policy is held to the
same gradients too.
"""

import jax
import numpy as np
import pytest

import parallel_helpers as ph
from mimo_jax.config import REMAT_POLICIES
from mimo_jax.model.transformer import MiMoV2Flash, positions_from_segments
from mimo_jax.parallel import PRESETS, Parallelism, mesh_config_from_dict
from mimo_jax.train.step import make_eval_step

# preset -> (ICI axis sizes on 8 devices, remat policy)
MESHES = {
    "fsdp": ("fsdp=8", "save_dots"),
    "fsdp_tp": ("fsdp=4,tensor=2", "save_dots_no_batch"),
    "fsdp_ep": ("fsdp=2,expert=4", "none"),
    "fsdp_tp_ep": ("fsdp=2,expert=2,tensor=2", "full"),
    "fsdp_cp": ("fsdp=2,context=4", "full"),
    "fsdp_ep_cp": ("fsdp=2,expert=2,context=2", "save_dots"),
    "fsdp_tp_ep_cp": ("expert=2,context=2,tensor=2", "full"),
}


def _reference(**overrides):
    """Parameters, batch, and the single-device loss and gradients (dense MoE dispatch)."""
    model = MiMoV2Flash(ph.parallel_model_config(dict(moe_impl="dense"), **overrides))
    params = ph.random_params(model)
    batch = ph.packed_batch()
    loss, grads = jax.jit(jax.value_and_grad(lambda p, b: ph.objective(model, p, b)),
                          compiler_options=ph.QUICK_COMPILE)(params, batch)
    return params, batch, loss, grads


@pytest.fixture(scope="module", name="references")
def fixture_references():
    """References computed on first use: the 3-layer model with its MTP head (for the
    context-parallel presets, whose MTP shift crosses shard borders) and the 2-layer model
    without one (the rest; it compiles faster)."""
    cache = {}

    def get(context_parallel: bool):
        if context_parallel not in cache:
            cache[context_parallel] = _reference(**({} if context_parallel else ph.SMALL))
        return cache[context_parallel]
    return get


def test_every_preset_and_remat_policy_is_covered():
    assert set(MESHES) == set(PRESETS)
    assert {policy for _, policy in MESHES.values()} == set(REMAT_POLICIES)


@pytest.mark.parametrize("preset", sorted(MESHES))
def test_sharded_step_equals_single_device(preset, references):
    context_parallel = "cp" in preset
    params, batch, want_loss, want_grads = references(context_parallel)
    ici, remat_policy = MESHES[preset]
    parallelism = Parallelism.from_config(mesh_config_from_dict(dict(ici=ici, rules=preset)))
    moe_impl = "expert_parallel" if "ep" in preset else "dense"
    overrides = {} if context_parallel else dict(ph.SMALL)
    model = MiMoV2Flash(ph.parallel_model_config(
        dict(moe_impl=moe_impl, remat_policy=remat_policy), **overrides))
    _, param_shardings = parallelism.param_shardings(model)
    batch_shardings = parallelism.batch_shardings(batch)
    step = parallelism.jit(jax.value_and_grad(lambda p, b: ph.objective(model, p, b)),
                           (param_shardings, batch_shardings),
                           (parallelism.replicated, param_shardings),
                           compiler_options=ph.QUICK_COMPILE)
    loss, grads = step(jax.device_put(params, param_shardings),
                       parallelism.put_batch(batch, batch_shardings))
    assert abs(float(loss) - float(want_loss)) <= 1e-5 * abs(float(want_loss))
    assert ph.max_relative_error(grads, want_grads) < 1e-5
    for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(param_shardings)):
        assert got.sharding.is_equivalent_to(want, got.ndim)


def test_capacity_drops_in_training_but_evaluation_is_dropless():
    """Expert parallelism (fsdp=2 x expert=4) with a capacity factor of 0.25: the training
    forward drops token copies (and counts them), the eval step lifts the capacity and equals
    the single-device dense model."""
    parallelism = Parallelism.from_config(
        mesh_config_from_dict(dict(ici="fsdp=2,expert=4", rules="fsdp_ep")))
    batch = ph.packed_batch()
    batch["positions"] = np.asarray(positions_from_segments(batch["segment_ids"]))
    dense = MiMoV2Flash(ph.parallel_model_config(dict(moe_impl="dense"), **ph.SMALL))
    params = ph.random_params(dense)
    want = jax.jit(make_eval_step(dense, dense.config))(params, batch)
    model = MiMoV2Flash(ph.parallel_model_config(
        dict(moe_impl="expert_parallel", expert_capacity_factor=0.25), **ph.SMALL))
    _, param_shardings = parallelism.param_shardings(model)
    batch_shardings = parallelism.batch_shardings(batch)
    params = jax.device_put(params, param_shardings)
    batch = parallelism.put_batch(batch, batch_shardings)
    dropped = parallelism.jit(
        lambda p, b: model.apply({"params": p}, b["tokens"],
                                 segment_ids=b["segment_ids"]).dropped_copies,
        (param_shardings, batch_shardings), parallelism.replicated,
        compiler_options=ph.QUICK_COMPILE)(params, batch)
    assert int(dropped.sum()) > 0
    got = parallelism.jit_eval_step(make_eval_step(model, model.config), param_shardings,
                                    batch_shardings,
                                    compiler_options=ph.QUICK_COMPILE)(params, batch)
    np.testing.assert_allclose(np.asarray(got["sums"]), np.asarray(want["sums"]), rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(got["counts"]), np.asarray(want["counts"]))
