"""Supervised fine-tuning on the micro model, in process.

Everything that runs the compiled program sits in one test function (`test_sft_end_to_end`), so
that pytest-xdist does not compile it once per worker; the runs share a persistent compilation
cache, so only the first one compiles. The other tests fail before any compilation.
"""

import functools
import json
import os
import pathlib
import subprocess
import sys

import chex
import jax
import numpy as np
import pytest
from compile_options import QUICK_COMPILE

from configs import sft_tiny
from mimo_jax.config import ConfigError, model_config_from_dict
from mimo_jax.convert import hf
from mimo_jax.data import sft
from mimo_jax.data import tokenizer as tokenizer_lib
from mimo_jax.data.errors import DataError
from mimo_jax.model.moe import CORRECTION_BIAS
from mimo_jax.model.transformer import MiMoV2Flash, init_params
from mimo_jax.train import init_from, losses, partition, sft_loss, sft_trainer, trainer
from mimo_jax.train.checkpoint import CheckpointError, export_params, load_exported
from mimo_jax.train.step import zero_grad_params

REPO = pathlib.Path(__file__).resolve().parents[2]
STEPS = 6
WORDS = ["def", "return", "self", "x", "y", "(", ")", ":", "=", "+", "if", "else"]
RECORD_KEYS = ("loss", "ce", "mtp", "balance", "grad_norm", "learning_rate", "zero_grad_params")


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


@pytest.fixture(scope="module", name="sft_data")
def fixture_sft_data(tmp_path_factory):
    """train.jsonl (48 examples) and eval.jsonl (8) of the test language's words."""
    rng = np.random.default_rng(3)
    root = tmp_path_factory.mktemp("sft_data")

    def examples(count):
        return [{"prompt": " ".join(rng.choice(WORDS, size=int(rng.integers(1, 6)))),
                 "response": " ".join(rng.choice(WORDS, size=int(rng.integers(1, 8))))}
                for _ in range(count)]
    return (write_jsonl(root / "train.jsonl", examples(48)),
            write_jsonl(root / "eval.jsonl", examples(8)))


def random_params(model_config, seed):
    """Parameters of `model_config`'s shapes without compiling its init: norm scales 1, router
    biases 0, every other weight normal with std 0.05."""
    rng = np.random.default_rng(seed)

    def value(path, spec):
        name = str(getattr(path[-1], "key", ""))
        if name == "scale":
            return np.ones(spec.shape, spec.dtype)
        if name == CORRECTION_BIAS:
            return np.zeros(spec.shape, spec.dtype)
        return (0.05 * rng.normal(size=spec.shape)).astype(spec.dtype)
    shapes = jax.eval_shape(lambda: init_params(MiMoV2Flash(model_config), jax.random.key(0)))
    return jax.tree_util.tree_map_with_path(value, shapes)


@pytest.fixture(scope="module", name="init_export")
def fixture_init_export(tmp_path_factory, micro, corpus_dir):
    """A params export of the micro model (one MTP head) with the test tokenizer: what SFT
    starts from."""
    config = micro.build_config({f"model.{k}": v for k, v in micro.MICRO_MODEL.items()})
    model_config = model_config_from_dict(config.model)
    params = random_params(model_config, seed=7)
    return export_params(tmp_path_factory.mktemp("init") / "export", params, model_config,
                         corpus_dir / "tokenizer.json")


def sft_config(micro, sft_data, init_path, **extra):
    """configs/sft_tiny.py on the micro model with 2 MTP heads (the second copied from the
    init's one), a few steps at a rate that moves the loss."""
    train_file, eval_file = sft_data
    overrides = {f"model.{k}": v for k, v in micro.MICRO_MODEL.items()}
    overrides.update({
        "model.num_mtp_heads": 2, "sft.copy_mtp_head": True, "init_from": str(init_path),
        "data.train_sources": f"jsonl:{train_file}", "data.eval_sources": f"jsonl:{eval_file}",
        "data.seq_len": 32, "data.batch_size": 4, "data.eval_batches": 2,
        "train.steps": STEPS, "train.learning_rate": 3e-3, "train.end_learning_rate": 3e-4,
        "train.log_every": 1, "train.eval_every": 3, "train.checkpoint_every": 3,
        "train.keep_last": 10, "train.progress": "log", "train.num_devices": 1})
    overrides.update(extra)
    config = sft_tiny.get_config()
    config.update_from_flattened_dict(overrides)
    return config


def metric_records(workdir, kind="train"):
    lines = (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


class StopAfter:
    """`stop_requested` that turns true after `steps` steps (the loop asks once per step)."""

    def __init__(self, steps):
        self.steps, self.calls = steps, 0

    def __call__(self):
        self.calls += 1
        return self.calls >= self.steps


def numpy_masked_cross_entropy(logits, tokens, segment_ids, loss_mask, shift):
    """(sum, count) of -log softmax(logits[b, t])[tokens[b, t + shift]] over the targets that
    are response tokens (loss_mask) of the same example, in float64."""
    total, count = 0.0, 0
    for b in range(logits.shape[0]):
        for t in range(logits.shape[1] - shift):
            if (segment_ids[b, t] > 0 and segment_ids[b, t + shift] == segment_ids[b, t]
                    and loss_mask[b, t + shift]):
                row = logits[b, t].astype(np.float64)
                log_z = np.log(np.sum(np.exp(row - row.max()))) + row.max()
                total += log_z - row[tokens[b, t + shift]]
                count += 1
    return total, count


def numpy_zero_grads(grads):
    """Trained parameters (correction biases left out) whose gradient is exactly 0."""
    flat = jax.tree_util.tree_leaves_with_path(grads)
    return sum(int(np.sum(np.asarray(g) == 0)) for path, g in flat
               if str(getattr(path[-1], "key", "")) != CORRECTION_BIAS)


def check_straight_run(config, workdir, capsys):
    log = []
    result = sft_trainer.run(config, workdir, log=log.append)
    shown = capsys.readouterr().out
    assert result.status == "done" and result.step == STEPS and result.last_checkpoint == STEPS
    assert any(line.startswith("init_from: params export") for line in log), log
    assert any(line.startswith("initialised from params export") for line in log), log
    train = metric_records(workdir)
    assert [r["step"] for r in train] == list(range(1, STEPS + 1))
    for record in train:
        assert set(RECORD_KEYS) <= set(record)
        assert record["zero_grad_params"] > 0  # embedding rows of tokens not in the batch
        assert f"step {record['step']}/{STEPS}" in shown
    assert f"zero_grad_params {int(train[-1]['zero_grad_params']):,}" in shown
    assert train[0]["learning_rate"] == pytest.approx(3e-3)  # the cosine starts at the peak
    evals = metric_records(workdir, "eval")
    assert [r["step"] for r in evals] == [0, 3, 6]
    assert evals[-1]["loss"] < evals[0]["loss"]
    for name in ("config.json", "tokenizer.json", "export/model_config.json", "loss.png"):
        assert (workdir / name).is_file(), name
    saved = json.loads((workdir / "config.json").read_text())
    assert saved["init_from"] == config.init_from and saved["sft"]["copy_mtp_head"] is True
    assert sorted(int(p.name) for p in (workdir / "checkpoints").iterdir()) == [3, 6]


def check_resume_is_exact(config, straight, resumed):
    """Stopped after step 2, then resumed (with an init_from that would fail if it were read):
    the same records and final parameters as the straight run."""
    first = sft_trainer.run(config, resumed, stop_requested=StopAfter(2), log=lambda _: None)
    assert first.status == "preempted" and first.step == 2 and first.last_checkpoint == 2
    log = []
    config.init_from = str(resumed / "nowhere")
    second = sft_trainer.run(config, resumed, log=log.append)
    assert second.status == "done" and second.step == STEPS
    assert f"resumed from {resumed / 'checkpoints' / '2'}" in log
    assert any("init_from=" in line and "is not read" in line for line in log), log
    a, b = metric_records(straight), metric_records(resumed)
    assert [r["step"] for r in b] == list(range(1, STEPS + 1))
    for x, y in zip(a, b):
        for key in RECORD_KEYS:
            assert x[key] == y[key], (x["step"], key)
    assert [(r["step"], r["loss"]) for r in metric_records(straight, "eval")] == [
        (r["step"], r["loss"]) for r in metric_records(resumed, "eval")]
    chex.assert_trees_all_equal(load_exported(straight / "export")[1],
                                load_exported(resumed / "export")[1])


def check_one_step_by_hand(config, init_export):
    """The run's compiled step (from the cache) on its first batch: the cross-entropies count
    the response targets only, and `zero_grad_params` is the count of exact zeros in the
    gradient of the same objective computed apart."""
    configs = trainer.build_configs(config)
    parallelism = partition.make_parallelism(configs.mesh, 1)
    program = trainer.step_program(configs, parallelism, configs.train.seed,
                                   count_zero_grads=True)
    source = init_from.locate(init_export, configs.model)
    params = init_from.load_params(source, configs.model, copy_mtp_head=True,
                                   shardings=program.state_shardings.params)
    # The second MTP head starts as a copy of the pretrained one.
    _, exported = load_exported(init_export)
    chex.assert_trees_all_equal(params["mtp_0"], exported["mtp_0"])
    chex.assert_trees_all_equal(params["mtp_1"], exported["mtp_0"])
    assert "mtp_1" not in exported

    tokenizer = tokenizer_lib.load_tokenizer(source.tokenizer_file)
    examples = sft_trainer.open_records(configs.data.train_sources)
    batch = next(iter(sft.sft_batches(examples, tokenizer, configs.data.seq_len,
                                      configs.data.batch_size, seed=configs.data.seed)))
    assert 0 < batch["loss_mask"].sum() < (batch["segment_ids"] > 0).sum()  # prompts are masked
    model, train_cfg = program.model, configs.train

    @functools.partial(jax.jit, compiler_options=QUICK_COMPILE)
    def logits_and_grads(params, batch):
        def objective(p):
            out = model.apply({"params": p}, batch["tokens"], segment_ids=batch["segment_ids"],
                              positions=batch["positions"], return_mtp=True)
            sums = sft_loss.sft_loss_sums(out, batch["tokens"], batch["segment_ids"],
                                          batch["loss_mask"])
            counts = sft_loss.sft_target_counts(batch["segment_ids"], batch["loss_mask"], 2)
            loss, _ = losses.total_loss(sums, counts, out.balance_loss,
                                        train_cfg.mtp_loss_weight, train_cfg.balance_loss_weight)
            return loss, (out.logits, out.mtp_logits)
        (_, outputs), grads = jax.value_and_grad(objective, has_aux=True)(params)
        return outputs, grads

    (logits, mtp_logits), grads = jax.device_get(logits_and_grads(params, batch))
    state = program.state_with_params(params, train_cfg.seed)
    _, metrics = program.train_step(state, program.global_batch(batch, parallelism),
                                    np.float32(3e-3))
    metrics = jax.device_get(metrics)
    args = (batch["tokens"], batch["segment_ids"], batch["loss_mask"])
    ce_sum, ce_count = numpy_masked_cross_entropy(logits, *args, shift=1)
    assert float(metrics["ce"]) == pytest.approx(ce_sum / ce_count, rel=1e-5)
    mtp = [numpy_masked_cross_entropy(mtp_logits[k], *args, shift=k + 2) for k in range(2)]
    assert float(metrics["mtp"]) == pytest.approx(np.mean([s / c for s, c in mtp]), rel=1e-5)
    # Scoring every target instead (pretraining's loss) gives another number.
    everything = (batch["segment_ids"] > 0).astype(np.int32)
    all_sum, all_count = numpy_masked_cross_entropy(logits, batch["tokens"],
                                                    batch["segment_ids"], everything, 1)
    assert all_count > ce_count and abs(all_sum / all_count - ce_sum / ce_count) > 1e-3
    zeros = numpy_zero_grads(grads)
    assert zeros > 0 and float(metrics["zero_grad_params"]) == zeros


def test_sft_end_to_end(tmp_path, micro, sft_data, init_export, capsys):
    """Everything that needs the compiled program, in one test function."""
    config = sft_config(micro, sft_data, init_export)
    check_straight_run(config, tmp_path / "straight", capsys)
    check_resume_is_exact(sft_config(micro, sft_data, init_export), tmp_path / "straight",
                          tmp_path / "resumed")
    check_one_step_by_hand(config, init_export)
    # A training workdir as init_from: its newest checkpoint's parameters, as exported.
    model_config = trainer.build_configs(config).model
    source = init_from.locate(tmp_path / "straight", model_config)
    assert source.kind == init_from.CHECKPOINT and source.path.name == str(STEPS)
    assert source.tokenizer_file == tmp_path / "straight" / "tokenizer.json"
    chex.assert_trees_all_equal(init_from.load_params(source, model_config),
                                load_exported(tmp_path / "straight" / "export")[1])


def test_zero_grad_params_counts_exact_zeros_of_trained_leaves():
    rng = np.random.default_rng(0)
    grads = {"embed": {"embedding": rng.normal(size=(6, 4)).astype(np.float32)},
             "layer": {"w": rng.normal(size=(2, 3, 5)).astype(np.float32),
                       "moe": {CORRECTION_BIAS: np.zeros(4, np.float32)}},
             "scale": np.float32(0.0)}
    grads["embed"]["embedding"][[1, 4]] = 0.0
    grads["layer"]["w"][1, 2, 1:4] = 0.0
    grads["layer"]["w"][0, 0, 0] = -0.0
    assert float(jax.jit(zero_grad_params)(grads)) == numpy_zero_grads(grads) == 8 + 3 + 1 + 1


def test_init_from_hf_directory_and_mtp_copy(tmp_path, micro):
    """A Hugging Face directory of a 1-head model loads as saved; with the copy option a 3-head
    run gets heads 1 and 2 equal to head 0. (transformers needs twice the global layers' KV
    heads on the sliding ones, hence 2 here.)"""
    overrides = {f"model.{k}": v for k, v in micro.MICRO_MODEL.items()}
    overrides["model.sliding.num_kv_heads"] = 2
    saved_config = model_config_from_dict(micro.build_config(overrides).model)
    params = random_params(saved_config, seed=0)
    hf.save(saved_config, params, str(tmp_path / "hf"))
    run_config = model_config_from_dict(micro.build_config(
        {**overrides, "model.num_mtp_heads": 3}).model)
    source = init_from.locate(tmp_path / "hf", run_config)
    assert source.kind == init_from.HF and source.tokenizer_file is None
    loaded = init_from.load_params(source, run_config, copy_mtp_head=True)
    assert sorted(k for k in loaded if k.startswith("mtp_")) == ["mtp_0", "mtp_1", "mtp_2"]
    for head in ("mtp_0", "mtp_1", "mtp_2"):
        chex.assert_trees_all_equal(loaded[head], params["mtp_0"])
    chex.assert_trees_all_equal({k: v for k, v in loaded.items() if k in params}, params)
    with pytest.raises(CheckpointError, match=r"model.num_mtp_heads: checkpoint=1 run=3 "
                                              r"\(sft.copy_mtp_head=True starts MTP heads 1..2"):
        init_from.check_architecture(source, run_config, copy_option="sft.copy_mtp_head")


def test_init_from_refuses_what_it_cannot_use(tmp_path, micro, sft_data, init_export,
                                             corpus_dir):
    def run(**extra):
        config = sft_config(micro, sft_data, extra.pop("init", init_export), **extra)
        return sft_trainer.run(config, tmp_path / "wd", log=lambda _: None)

    with pytest.raises(CheckpointError, match="different model architecture: "
                                              "model.hidden_size: checkpoint=32 run=48"):
        run(**{"model.hidden_size": 48})
    with pytest.raises(CheckpointError, match="model.num_mtp_heads: checkpoint=1 run=2 "
                                              r"\(sft.copy_mtp_head=True"):
        run(**{"sft.copy_mtp_head": False})
    other = tokenizer_lib.train_bpe(["alpha beta gamma delta"] * 50, 300, 10_000)
    other.save(tmp_path / "other_tokenizer.json")
    with pytest.raises(CheckpointError, match=f"the run's tokenizer '{tmp_path}/other_tokenizer"
                                              rf"\.json' is not the tokenizer '{init_export}/"
                                              r"tokenizer\.json' saved with init_from"):
        run(**{"data.tokenizer": str(tmp_path / "other_tokenizer.json")})
    # The same tokenizer named explicitly is fine (the run then fails on something else).
    with pytest.raises(CheckpointError, match="does not exist"):
        run(init=tmp_path / "missing", **{"data.tokenizer": str(corpus_dir / "tokenizer.json")})
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(CheckpointError, match="holds no parameters"):
        run(init=tmp_path / "empty_dir")
    assert not (tmp_path / "wd" / "checkpoints").exists() or not list(
        (tmp_path / "wd" / "checkpoints").iterdir())


def test_bad_input_fails_before_training(tmp_path, micro, sft_data, init_export):
    def run(train_file, **extra):
        config = sft_config(micro, sft_data, init_export,
                            **{"data.train_sources": f"jsonl:{train_file}", **extra})
        return sft_trainer.run(config, tmp_path / "wd", log=lambda _: None)

    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(DataError, match=f"'{tmp_path}/empty.jsonl' holds no documents"):
        run(tmp_path / "empty.jsonl")
    with pytest.raises(DataError, match="SFT data path .*nowhere.* matches no files"):
        run(tmp_path / "nowhere" / "*.jsonl")
    with pytest.raises(ConfigError, match="'data.train_sources' = .*'text' is not one"):
        run(tmp_path / "x", **{"data.train_sources": f"text:{tmp_path}"})
    with pytest.raises(ConfigError, match="'sft.too_long' = 'cut'"):
        run(tmp_path / "x", **{"sft.too_long": "cut"})


def test_cli_error_is_one_line(tmp_path, micro, init_export):
    """`python -m mimo_jax.train.sft` on a record without a response: one line names it."""
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "x", "answer": "1"}] * 2)
    overrides = {f"model.{k}": v for k, v in micro.MICRO_MODEL.items()}
    overrides.update({"init_from": init_export, "data.train_sources": f"jsonl:{bad}",
                      "data.eval_sources": "", "data.shuffle": False, "model.num_mtp_heads": 2,
                      "sft.copy_mtp_head": True, "train.num_devices": 1, "data.seq_len": 32,
                      "data.batch_size": 4})
    result = subprocess.run(
        [sys.executable, "-m", "mimo_jax.train.sft", "--config", "configs/sft_tiny.py",
         f"--workdir={tmp_path / 'wd'}", *micro.command_line(overrides)],
        cwd=REPO, capture_output=True, text=True, timeout=300, check=False,
        env={**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO)})
    assert result.returncode == 1, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: SFT file '{bad}' line 1 has no field 'response'"), result.stderr[-3000:]
