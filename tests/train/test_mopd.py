"""The MOPD trainer end to end on a micro model: a few steps write metrics, checkpoints and an
export; a stopped and resumed run equals an uninterrupted one (the sampling included); bad input
stops with one line naming it before anything compiles."""

import json
import pathlib

import jax
import numpy as np
import pytest

from configs import mopd_demo, mopd_tiny
from mimo_jax.config import model_config_from_dict
from mimo_jax.config_reader import ConfigError
from mimo_jax.data.errors import DataError
from mimo_jax.data.tokenizer import train_bpe
from mimo_jax.eval.tasks import get_task
from mimo_jax.model.transformer import MiMoV2Flash, init_params
from mimo_jax.train import mopd_trainer, sft_trainer
from mimo_jax.train.checkpoint import CheckpointError, export_params
from mimo_jax.train.mopd_step import PER_DOMAIN_KEYS, RECORD_KEYS, minibatch_rows


# The micro model of the trainer tests (tests/train/conftest.py), set by the `exports` fixture.
MODEL: dict = {}


def _config(student: pathlib.Path, teacher: pathlib.Path, **extra):
    config = mopd_tiny.get_config()
    overrides = {f"model.{k}": v for k, v in MODEL.items()}
    overrides.update({
        "init_from": str(student), "mopd.teachers": f"addition={teacher},reverse={teacher}",
        "mopd.prompts_per_domain": 2, "mopd.samples_per_prompt": 2,
        "mopd.max_prompt_tokens": 16, "mopd.max_response_tokens": 4, "mopd.eval_prompts": 2,
        "train.steps": 3, "train.log_every": 1, "train.eval_every": 0,
        "train.checkpoint_every": 2, "train.progress": "log", "train.tensorboard": False,
        "train.plot": False, "train.learning_rate": 1e-2, "train.end_learning_rate": 1e-2})
    overrides.update(extra)
    config.update_from_flattened_dict(overrides)
    return config


@pytest.fixture(scope="module", name="exports")
def fixture_exports(tmp_path_factory, micro):
    """A student export and a different teacher export of the micro model, sharing a tokenizer
    trained on the tasks' text."""
    MODEL.update(micro.MICRO_MODEL)
    root = tmp_path_factory.mktemp("mopd")
    texts = [p + a for task in ("addition", "reverse") for p, a in get_task(task).examples(0, 200)]
    tokenizer = train_bpe(texts, vocab_size=320, max_bytes=100_000)
    tokenizer.save(root / "tokenizer.json")
    config = model_config_from_dict(_config(root, root).model)
    out = []
    for name, seed in (("student", 0), ("teacher", 1)):
        params = init_params(MiMoV2Flash(config), jax.random.key(seed))
        out.append(export_params(root / name, params, config, root / "tokenizer.json"))
    return tuple(out) + (root,)


def _final_params(workdir: pathlib.Path):
    return mopd_trainer.init_from.load_params(
        mopd_trainer.init_from.locate(workdir / "export", None), _model(workdir))


def _model(workdir: pathlib.Path):
    return model_config_from_dict(json.loads((workdir / "export" / "model_config.json")
                                             .read_text()))


def test_mopd_steps_write_metrics_and_resume_exactly(exports, tmp_path):
    student, teacher, _ = exports
    straight = mopd_trainer.run(_config(student, teacher), tmp_path / "straight",
                                log=lambda _: None)
    assert straight.status == "done" and straight.step == 3
    records = [json.loads(line) for line in (tmp_path / "straight" / "metrics.jsonl").open()]
    train = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in train] == [1, 2, 3]
    keys = set().union(*(r.keys() for r in train))
    for key in RECORD_KEYS + tuple(f"{k}/addition" for k in PER_DOMAIN_KEYS):
        assert key in keys, key
    first = train[0]
    assert 0.0 <= first["reward"] <= 1.0 and 0.0 <= first["masked_share"] <= 1.0
    assert first["reverse_kl"] != 0.0  # student and teacher differ

    stops = iter([False, True])  # stop after step 2, where a checkpoint is due anyway
    stopped = mopd_trainer.run(_config(student, teacher), tmp_path / "resumed",
                               stop_requested=lambda: next(stops, False), log=lambda _: None)
    assert stopped.status == "preempted" and stopped.step == 2
    resumed = mopd_trainer.run(_config(student, teacher), tmp_path / "resumed",
                               log=lambda _: None)
    assert resumed.status == "done" and resumed.step == 3
    chex_equal = jax.tree.map(lambda a, b: np.array_equal(np.asarray(a), np.asarray(b)),
                              _final_params(tmp_path / "straight"),
                              _final_params(tmp_path / "resumed"))
    assert all(jax.tree.leaves(chex_equal))


@pytest.mark.parametrize("extra, error, words", [
    ({"mopd.teachers": "addition=/nonexistent/teacher,reverse=/nonexistent/teacher"},
     CheckpointError, "does not exist"),
    ({"mopd.teachers": "addition=T,multiplication=T"}, ConfigError, "multiplication"),
    ({"mopd.rewards": "addition=exact,reverse=exact_match"}, ConfigError, "'exact'"),
    ({"mopd.domains": "addition,reverse,sort"}, ConfigError, "'sort' has no entry"),
    ({"init_from": ""}, ConfigError, "init_from"),
    ({"mopd.updates_per_step": 3}, ConfigError, "'mopd.updates_per_step' = 3"),
])
def test_bad_input_stops_with_one_line(exports, tmp_path, extra, error, words):
    student, teacher, _ = exports
    with pytest.raises(error, match=words):
        mopd_trainer.run(_config(student, teacher, **extra), tmp_path / "bad", log=lambda _: None)


def test_minibatch_rows_keep_groups_and_domain_shares():
    """4 prompts of 3 samples in 2 minibatches: every row once, a prompt's samples together,
    and with 2 domains of 2 prompts each minibatch holds one prompt of each domain."""
    parts = minibatch_rows(prompts=4, samples=3, updates=2)
    np.testing.assert_array_equal(np.sort(np.concatenate(parts)), np.arange(12))
    for rows in parts:
        groups = rows.reshape(-1, 3)
        np.testing.assert_array_equal(groups - groups[:, :1], np.tile(np.arange(3), (2, 1)))
        assert sorted(groups[:, 0] // 6) == [0, 1]  # domain of each prompt: rows 0-5, 6-11


def test_minibatch_updates_report_the_whole_batch(exports, tmp_path):
    """With frozen weights (a learning rate of 1e-30 moves no float32 weight; no router-bias rule,
    no balance loss) a step split into 2 updates reports the loss and per-domain lengths of the
    unsplit step, and samples the same responses: equal minibatches of whole groups."""
    student, teacher, _ = exports
    frozen = {"train.steps": 1, "train.checkpoint_every": 1, "train.learning_rate": 1e-30,
              "train.end_learning_rate": 1e-30, "train.bias_update_rate": 0.0,
              "train.balance_loss_weight": 0.0,
              "mopd.prompts_per_domain": 2, "mopd.eval_prompts": 0}
    records = {}
    for updates in (1, 2):
        workdir = tmp_path / str(updates)
        mopd_trainer.run(_config(student, teacher, **frozen, **{
            "mopd.updates_per_step": updates}), workdir, log=lambda _: None)
        records[updates] = json.loads((workdir / "metrics.jsonl").read_text().splitlines()[0])
    # The loss nearly cancels (advantages of both signs times log-probs of size ~ce), so its
    # float32 rounding is absolute, on the terms' scale.
    np.testing.assert_allclose(records[2]["loss"], records[1]["loss"], rtol=0,
                               atol=1e-6 * records[1]["ce"])
    for key in ("reward", "accuracy"):
        np.testing.assert_allclose(records[2][key], records[1][key], rtol=1e-6, err_msg=key)
    for domain in ("addition", "reverse"):
        key = f"response_length/{domain}"
        np.testing.assert_allclose(records[2][key], records[1][key], rtol=1e-6, err_msg=key)


def test_teacher_with_another_tokenizer_is_refused(exports, tmp_path):
    student, teacher, root = exports
    other = tmp_path / "other_teacher"
    config = model_config_from_dict(_config(root, root).model)
    tokenizer = train_bpe(["abc def"] * 50, vocab_size=300, max_bytes=10_000)
    tokenizer.save(tmp_path / "tokenizer.json")
    export_params(other, init_params(MiMoV2Flash(config), jax.random.key(2)), config,
                  tmp_path / "tokenizer.json")
    with pytest.raises(CheckpointError, match="must share one tokenizer"):
        mopd_trainer.run(_config(student, teacher, **{
            "mopd.teachers": f"addition={other},reverse={teacher}"}), tmp_path / "run",
            log=lambda _: None)


def test_empty_prompt_file_is_refused(exports, tmp_path):
    student, teacher, _ = exports
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(DataError, match="empty"):
        mopd_trainer.run(_config(student, teacher, **{
            "mopd.prompts": f"addition=jsonl:{tmp_path / 'empty.jsonl'},reverse=task:reverse"}),
            tmp_path / "run", log=lambda _: None)


def test_demonstration_configs_are_valid():
    """benchmarks/mopd.py's SFT and MOPD configs pass every check that needs no disk."""
    config = mopd_demo.get_config()
    config.init_from = "student/export"
    config.mopd.teachers = ",".join(f"{d}=teacher_{d}/export" for d in mopd_demo.DOMAINS)
    configs = mopd_trainer.build_configs(config)
    assert configs.mopd.domains == mopd_demo.DOMAINS
    assert configs.model.vocab_size == mopd_demo.VOCAB_SIZE
    sft = mopd_demo.sft_config("train.jsonl", "tokenizer.json", "", steps=10, learning_rate=1e-3)
    sft_trainer.check_config(sft)
    assert model_config_from_dict(sft.model) == configs.model


def test_mopd_on_a_mesh_equals_one_device(exports, tmp_path):
    """Two steps on 8 devices (fsdp=2 x expert=4: student and teacher split, rollouts and teacher
    scores decoded on the mesh, expert-parallel MoE) give one device's metrics and parameters;
    rows that do not split over the mesh are refused before anything compiles."""
    student, teacher, _ = exports
    settings = {"train.steps": 2, "train.checkpoint_every": 2, "mopd.prompts_per_domain": 4,
                "mopd.eval_prompts": 0, "model.runtime.moe_impl": "expert_parallel"}
    mesh = {"train.num_devices": 8, "mesh.ici": "fsdp=2,expert=4", "mesh.rules": "fsdp_ep"}
    for name, extra in (("one", {}), ("mesh", mesh)):
        result = mopd_trainer.run(_config(student, teacher, **settings, **extra),
                                  tmp_path / name, log=lambda _: None)
        assert result.status == "done" and result.step == 2
    records = {name: [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").open()]
               for name in ("one", "mesh")}
    for one, mesh_record in zip(records["one"], records["mesh"]):
        for key in ("loss", "reverse_kl", "reward", "response_length/addition"):
            np.testing.assert_allclose(mesh_record[key], one[key], rtol=1e-4, err_msg=key)
    # Step 2's metrics already depend on step 1's update. The final parameters are compared by
    # norm: Adam's first steps are about lr x sign(gradient), so a rounding-level difference in
    # a near-zero gradient entry moves that entry by up to 2 lr (lr 1e-2 here).
    for one, on_mesh in zip(jax.tree.leaves(_final_params(tmp_path / "one")),
                            jax.tree.leaves(_final_params(tmp_path / "mesh"))):
        one, on_mesh = np.asarray(one), np.asarray(on_mesh)
        assert np.linalg.norm(on_mesh - one) <= 1e-3 * np.linalg.norm(one)

    with pytest.raises(ConfigError, match=r"'mopd.prompts_per_domain' = 2: a domain's rows"):
        mopd_trainer.run(_config(student, teacher, **mesh), tmp_path / "bad",
                         log=lambda _: None)
    # 2 domains x 4 prompts x 2 samples in 4 updates: minibatches of 4 rows on 8 batch shards.
    with pytest.raises(ConfigError, match=r"'mopd.updates_per_step' = 4: a minibatch of 4 rows"):
        mopd_trainer.run(_config(student, teacher, **settings, **mesh,
                                 **{"mopd.updates_per_step": 4}), tmp_path / "bad_minibatch",
                         log=lambda _: None)
