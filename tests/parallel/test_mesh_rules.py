"""Mesh config parsing and filling, mesh construction, and the shardings each rule preset gives
the real model's parameters, optimizer state and batches (shapes only: nothing is compiled)."""

import jax
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

import parallel_helpers as ph
from mimo_jax.config import ConfigError
from mimo_jax.model.transformer import MiMoV2Flash
from mimo_jax.parallel import (MESH_AXES, PRESETS, Parallelism, make_mesh, mesh_config_from_dict,
                               mesh_shape)

FE = ("fsdp", "expert")
FC = ("fsdp", "context")
FCE = ("fsdp", "context", "expert")
# Expected mesh PartitionSpecs of four representative weights (scanned: leading layer axis).
#   q_proj [layers, embed, heads, head_dim]   expert gate [layers, experts, embed, mlp]
#   embedding [vocab, embed]                  router [layers, embed, None]
EXPECTED = {
    "fsdp": dict(q=P(None, "fsdp", None, None), gate=P(None, None, "fsdp", None),
                 embed=P(None, "fsdp"), router=P(None, "fsdp", None)),
    "fsdp_tp": dict(q=P(None, "fsdp", "tensor", None), gate=P(None, None, "fsdp", "tensor"),
                    embed=P("tensor", "fsdp"), router=P(None, "fsdp", None)),
    "fsdp_ep": dict(q=P(None, FE, None, None), gate=P(None, "expert", "fsdp", None),
                    embed=P(None, FE), router=P(None, FE, None)),
    "fsdp_cp": dict(q=P(None, FC, None, None), gate=P(None, None, FC, None),
                    embed=P(None, FC), router=P(None, FC, None)),
    "fsdp_ep_cp": dict(q=P(None, FCE, None, None), gate=P(None, "expert", FC, None),
                       embed=P(None, FCE), router=P(None, FCE, None)),
    "fsdp_tp_ep": dict(q=P(None, FE, "tensor", None), gate=P(None, "expert", "fsdp", "tensor"),
                       embed=P("tensor", FE), router=P(None, FE, None)),
    "fsdp_tp_ep_cp": dict(q=P(None, FCE, "tensor", None), gate=P(None, "expert", FC, "tensor"),
                          embed=P("tensor", FCE), router=P(None, FCE, None)),
}
BATCH = ("data", "fsdp", "expert")


def test_every_preset_has_expectations():
    assert set(EXPECTED) == set(PRESETS)


def test_axis_sizes_parse_and_fill():
    config = mesh_config_from_dict(dict(ici="fsdp=-1,expert=4", dcn="data=2", rules="fsdp_ep"))
    assert config.ici_sizes() == dict(data=1, fsdp=-1, expert=4, context=1, tensor=1)
    ici, dcn = mesh_shape(config, num_devices=16, num_slices=2)
    assert dict(zip(MESH_AXES, ici)) == dict(data=1, fsdp=2, expert=4, context=1, tensor=1)
    assert dict(zip(MESH_AXES, dcn)) == dict(data=2, fsdp=1, expert=1, context=1, tensor=1)
    config = mesh_config_from_dict(dict(ici={"tensor": 2, "fsdp": -1}))
    assert mesh_shape(config, 8)[0] == (1, 4, 1, 1, 2)


@pytest.mark.parametrize("mesh_cfg, message", [
    (dict(ici="fsdp=-1,expert=-1"), "at most one axis"),
    (dict(ici="pipeline=2"), "'pipeline'"),
    (dict(ici="fsdp=two"), "'two'"),
    (dict(ici="fsdp"), "not 'axis=size'"),
    (dict(rules="zero3"), "mesh.rules"),
    (dict(expert_capacity_factor=1.25),
     "'mesh.expert_capacity_factor' has moved: set 'model.runtime.expert_capacity_factor'"),
    (dict(expert_transport="auto"),
     "'mesh.expert_transport' has moved: set 'model.runtime.expert_transport'"),
    (dict(shape="1,8"), "'mesh.shape'"),
])
def test_bad_mesh_config_names_the_key(mesh_cfg, message):
    with pytest.raises(ConfigError, match=message):
        mesh_config_from_dict(mesh_cfg)


def test_sizes_that_do_not_fit_the_devices_fail():
    with pytest.raises(ConfigError, match="mesh.ici"):
        mesh_shape(mesh_config_from_dict(dict(ici="fsdp=3,expert=-1")), 8)
    with pytest.raises(ConfigError, match="mesh.ici"):
        mesh_shape(mesh_config_from_dict(dict(ici="fsdp=2,expert=2")), 8)
    # One process on this machine: there is no second slice to put data=2 across.
    with pytest.raises(ConfigError, match="mesh.dcn"):
        make_mesh(mesh_config_from_dict(dict(dcn="data=2")))


def test_mesh_over_eight_devices():
    mesh = make_mesh(mesh_config_from_dict(dict(ici="fsdp=2,expert=2,tensor=-1")))
    assert mesh.axis_names == MESH_AXES
    assert dict(mesh.shape) == dict(data=1, fsdp=2, expert=2, context=1, tensor=2)
    assert sorted(d.id for d in mesh.devices.flat) == list(range(8))
    assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_param_optimizer_and_batch_shardings_follow_the_rules(preset):
    ici = "fsdp=2,expert=2,tensor=2" if "tp" in preset else "fsdp=2,expert=2,context=2"
    parallelism = Parallelism.from_config(mesh_config_from_dict(dict(ici=ici, rules=preset)))
    config = ph.parallel_model_config(dict(moe_impl="expert_parallel"))
    params, shardings = parallelism.param_shardings(MiMoV2Flash(config))
    moe_run, dense_run = shardings["decoder"]["run_1"], shardings["decoder"]["run_0"]
    want = EXPECTED[preset]
    assert dense_run["attention"]["q_proj"].spec == want["q"]
    assert moe_run["moe"]["gate"].spec == want["gate"]
    assert shardings["embed"]["embedding"].spec == want["embed"]
    assert moe_run["moe"]["router"].spec == want["router"]
    # Every array splits evenly, and nothing is split twice over one mesh axis.
    for leaf, sharding in zip(jax.tree.leaves(params), jax.tree.leaves(shardings)):
        used = [a for entry in sharding.spec for a in ((entry,) if isinstance(entry, str)
                                                       else (entry or ()))]
        assert len(used) == len(set(used))
        assert sharding.shard_shape(leaf.shape)

    # AdamW moments take their parameter's sharding; the step counter is replicated.
    opt_state = jax.eval_shape(optax.adamw(1e-3).init, params)
    opt_shardings = parallelism.state_shardings(opt_state, params, shardings)
    mu = opt_shardings[0].mu
    assert jax.tree.leaves(mu) == jax.tree.leaves(shardings)
    assert opt_shardings[0].count.spec == P()

    batch = jax.eval_shape(lambda: ph.packed_batch())
    batch_shardings = parallelism.batch_shardings(batch)
    length = "context" if "cp" in preset else None
    assert batch_shardings["tokens"].spec == P(BATCH, length)


def test_put_batch_places_rows_and_sequence():
    parallelism = Parallelism.from_config(
        mesh_config_from_dict(dict(ici="fsdp=2,expert=2,context=2", rules="fsdp_ep_cp")))
    batch = ph.packed_batch()
    placed = parallelism.put_batch(batch)
    np.testing.assert_array_equal(np.asarray(placed["tokens"]), batch["tokens"])
    assert placed["tokens"].sharding.shard_shape(batch["tokens"].shape) == (2, 8)
