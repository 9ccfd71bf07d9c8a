"""The whole model under every rule preset on 8 devices: loss and gradients of the sharded step
equal the single-device step (1e-5 relative, float32), gradients come back in the parameters'
rule shardings; and the remat policies give equal gradients.

The single-device reference uses the dense MoE dispatch and plain attention; the expert-parallel
presets run `moe_impl="expert_parallel"` (all-to-all dispatch) and the context-parallel ones the
halo/all-gather attention, so these also hold the parallel paths to the reference end to end
(MTP shift and packed documents across shard borders included).
"""

import jax
import pytest

import parallel_helpers as ph
from mimo_jax.model.transformer import MiMoV2Flash
from mimo_jax.parallel import PRESETS, Parallelism, mesh_config_from_dict

MESHES = {
    "fsdp": "fsdp=8",
    "fsdp_tp": "fsdp=4,tensor=2",
    "fsdp_ep": "fsdp=2,expert=4",
    "fsdp_cp": "fsdp=2,context=4",
    "fsdp_ep_cp": "fsdp=2,expert=2,context=2",
    "fsdp_tp_ep": "fsdp=2,expert=2,tensor=2",
    "fsdp_tp_ep_cp": "expert=2,context=2,tensor=2",
}


def _reference(**overrides):
    """Parameters, batch, and the single-device loss and gradients (dense MoE dispatch)."""
    model = MiMoV2Flash(ph.parallel_model_config(moe_impl="dense", **overrides))
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


def test_every_preset_is_covered():
    assert set(MESHES) == set(PRESETS)


@pytest.mark.parametrize("preset", sorted(MESHES))
def test_sharded_step_equals_single_device(preset, references):
    context_parallel = "cp" in preset
    params, batch, want_loss, want_grads = references(context_parallel)
    parallelism = Parallelism.from_config(
        mesh_config_from_dict(dict(ici=MESHES[preset], rules=preset)))
    moe_impl = "expert_parallel" if "ep" in preset else "dense"
    # The context-parallel presets also rematerialise each layer ("full", as the full model
    # does), so the halo exchange and the expert all-to-all run again in the backward pass.
    overrides = dict(remat_policy="full") if context_parallel else ph.SMALL
    model = MiMoV2Flash(ph.parallel_model_config(moe_impl=moe_impl, **overrides))
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


def test_remat_policies_give_equal_gradients():
    policies = ("none", "full", "save_dots", "save_dots_no_batch")
    models = [MiMoV2Flash(ph.parallel_model_config(moe_impl="dense", remat_policy=policy,
                                                   **ph.SMALL)) for policy in policies]
    params, batch = ph.random_params(models[0]), ph.packed_batch()
    # One program holding the four differentiated models: one compile.
    results = jax.jit(lambda p, b: [jax.value_and_grad(
        lambda p, m=m: ph.objective(m, p, b))(p) for m in models],
        compiler_options=ph.QUICK_COMPILE)(params, batch)
    (want_loss, want_grads) = results[0]
    for policy, (loss, grads) in zip(policies, results):
        assert abs(float(loss) - float(want_loss)) <= 1e-6 * float(want_loss), policy
        assert ph.max_relative_error(grads, want_grads) < 1e-6, policy
