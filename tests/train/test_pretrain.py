"""The trainer as users run it: `python -m mimo_jax.train.pretrain` in real processes.

Exact resume: 24 steps straight, against SIGTERM near step 5 + resume + kill -9 near step 14 +
(a half-written checkpoint planted) + resume to 24: every logged loss and the final parameters
must be identical. Then bad inputs: each gives one `error:` line and loses no checkpoint.
The processes share a persistent compilation cache, so only the first one compiles.
"""

import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from mimo_jax.config import ConfigError
from mimo_jax.data.errors import DataError
from mimo_jax.data.token_shards import write_shards
from mimo_jax.train import trainer
from mimo_jax.train.checkpoint import CheckpointError, load_exported

REPO = pathlib.Path(__file__).resolve().parents[2]
STEPS = 24


@pytest.fixture(scope="module", name="env")
def fixture_env(tmp_path_factory):
    env = dict(os.environ)
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO),
               JAX_COMPILATION_CACHE_DIR=str(tmp_path_factory.mktemp("xla_cache")),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1")
    # One CPU device, as on a user's machine; the lowest backend optimisation level halves the
    # compile time of these tiny programs and changes no result the tests compare.
    env["XLA_FLAGS"] = "--xla_backend_optimization_level=0"
    return env


def start(workdir, overrides, env, micro) -> subprocess.Popen:
    args = [sys.executable, "-m", "mimo_jax.train.pretrain", "--config", "configs/tiny.py",
            f"--workdir={workdir}", *micro.command_line(overrides)]
    return subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def finish(process, timeout=240) -> tuple[int, str, str]:
    stdout, stderr = process.communicate(timeout=timeout)
    return process.returncode, stdout, stderr


def records(workdir, kind="train"):
    path = pathlib.Path(workdir) / "metrics.jsonl"
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if record["kind"] == kind:
            out.append(record)
    return out


def wait_for_step(process, workdir, step, timeout=240):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if any(r["step"] >= step for r in records(workdir)):
            return
        if process.poll() is not None:
            raise AssertionError(f"run ended early: {process.communicate()[1][-3000:]}")
        time.sleep(0.05)
    process.kill()
    raise AssertionError(f"step {step} not reached in {timeout}s")


def checkpoint_steps(workdir):
    directory = pathlib.Path(workdir) / "checkpoints"
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())


def straight_and_interrupted_runs(root, corpus_dir, env, micro):
    """The straight run and the interrupted one, both finished."""
    overrides = micro.micro_overrides(corpus_dir, **{"train.steps": STEPS, "train.eval_every": 12})
    straight = root / "straight"
    # Retention only changes which checkpoints are deleted: keep the newest 2 and every 6th.
    code, stdout, stderr = finish(start(straight, dict(overrides, **{
        "train.keep_last": 2, "train.keep_every": 6}), env, micro))
    assert code == 0, stderr[-3000:]
    assert checkpoint_steps(straight) == [6, 12, 18, 21, 24]

    resumed = root / "resumed"
    process = start(resumed, overrides, env, micro)
    wait_for_step(process, resumed, 5)
    process.send_signal(signal.SIGTERM)
    code, _, stderr = finish(process)
    assert code == 0, stderr[-3000:]
    assert "received SIGTERM" in stderr
    stopped_at = max(r["step"] for r in records(resumed))
    assert checkpoint_steps(resumed)[-1] == stopped_at  # saved exactly where it stopped
    assert stopped_at < STEPS

    process = start(resumed, overrides, env, micro)
    wait_for_step(process, resumed, 14)
    process.kill()  # SIGKILL: no handler runs, an async save may be cut short
    process.wait()
    assert max(r["step"] for r in records(resumed)) < STEPS

    # Plant a half-written checkpoint newer than every complete one (what a kill during the
    # final rename would leave): a copy of the newest, partly deleted, under Orbax's temp name.
    latest = checkpoint_steps(resumed)[-1]
    planted = resumed / "checkpoints" / f"{latest + 2}.orbax-checkpoint-tmp"
    shutil.copytree(resumed / "checkpoints" / str(latest), planted)
    shutil.rmtree(planted / "state")
    code, stdout, stderr = finish(start(resumed, overrides, env, micro))
    assert code == 0, stderr[-3000:]
    assert f"resumed from {resumed / 'checkpoints' / str(latest)}" in stdout
    assert not planted.exists()
    return straight, resumed, stdout


def check_resume_is_exact(straight, resumed):
    a, b = records(straight), records(resumed)
    assert [r["step"] for r in a] == list(range(1, STEPS + 1)) == [r["step"] for r in b]
    for x, y in zip(a, b):
        for key in ("loss", "ce", "mtp", "balance", "grad_norm", "learning_rate"):
            assert x[key] == y[key], (x["step"], key)
    assert records(straight, "eval") == [
        dict(r, time=t["time"]) for r, t in zip(records(resumed, "eval"),
                                                records(straight, "eval"))]
    _, params_a = load_exported(straight / "export")
    _, params_b = load_exported(resumed / "export")
    for x, y in zip(jax.tree.leaves(params_a), jax.tree.leaves(params_b)):
        np.testing.assert_array_equal(x, y)


def check_run_learns_and_reports_where_things_are(resumed, stdout):
    evals = records(resumed, "eval")
    assert [r["step"] for r in evals] == [0, 12, 24]
    assert evals[-1]["loss"] < evals[0]["loss"] - 0.3
    assert evals[-1]["perplexity"] == pytest.approx(np.exp(evals[-1]["loss"]))
    for name in ("config.json", "tokenizer.json", "loss.png", "export/model_config.json"):
        assert (resumed / name).is_file(), name
        assert name.split("/")[0] in stdout
    config = json.loads((resumed / "config.json").read_text())
    assert config["train"]["steps"] == STEPS and config["model"]["hidden_size"] == 32
    assert list((resumed / "tensorboard").glob("events.out.tfevents.*"))


def check_plot_command(resumed, directory):
    result = subprocess.run([sys.executable, "-m", "mimo_jax.train.plot", f"--workdir={resumed}",
                             f"--out={directory / 'curves.png'}"], cwd=REPO, capture_output=True,
                            text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    assert (directory / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    result = subprocess.run([sys.executable, "-m", "mimo_jax.train.plot",
                             f"--workdir={directory}"], cwd=REPO, capture_output=True, text=True,
                            timeout=120, check=False)
    assert result.returncode == 1 and "no metrics in" in result.stderr


def check_checkpoint_of_another_model_is_refused(straight, micro, corpus_dir):
    before = sorted(p.name for p in (straight / "checkpoints").iterdir())
    config = micro.build_config(micro.micro_overrides(corpus_dir, **{
        "train.steps": STEPS, "model.hidden_size": 48}))
    with pytest.raises(CheckpointError, match="different model config: "
                                              "model.hidden_size: checkpoint=32 run=48"):
        trainer.run(config, straight, log=lambda _: None)
    assert sorted(p.name for p in (straight / "checkpoints").iterdir()) == before


def check_changed_data_stream_is_refused(straight, micro, corpus_dir):
    config = micro.build_config(micro.micro_overrides(corpus_dir, **{
        "train.steps": STEPS, "data.seed": 5}))
    with pytest.raises(CheckpointError, match="different data stream.*data.seed: checkpoint=0 "
                                              "run=5"):
        trainer.run(config, straight, log=lambda _: None)


def check_damaged_checkpoint_is_named(straight, micro, corpus_dir, directory):
    shutil.copytree(straight, directory / "copy")
    for blob in (directory / "copy" / "checkpoints" / "24" / "state").rglob("d/*"):
        blob.unlink()
    config = micro.build_config(micro.micro_overrides(corpus_dir, **{"train.steps": 30}))
    with pytest.raises(CheckpointError, match="checkpoint .*/copy/checkpoints/24 cannot be "
                                              "restored"):
        trainer.run(config, directory / "copy", log=lambda _: None)


def test_bf16_compute_keeps_f32_weights(micro, corpus_dir):
    configs = trainer.build_configs(micro.build_config(micro.micro_overrides(corpus_dir, **{
        "train.compute_dtype": "bfloat16"})))
    assert (configs.model.runtime.dtype, configs.model.param_dtype) == ("bfloat16", "float32")


def test_bad_inputs_fail_before_training(tmp_path, micro, corpus_dir):
    def run(**extra):
        config = micro.build_config(micro.micro_overrides(corpus_dir, **extra))
        return trainer.run(config, tmp_path / "wd", log=lambda _: None)

    with pytest.raises(DataError, match="matches no files"):
        run(**{"data.train_sources": f"text:{tmp_path}/nowhere/*.py"})
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "a.py").write_text("")
    with pytest.raises(DataError, match="holds no documents"):
        run(**{"data.train_sources": f"text:{tmp_path / 'empty'}"})
    write_shards(iter([np.arange(3000, dtype=np.int32) % 300] * 30), tmp_path / "shards", 10,
                 {"vocab_size": 320})
    shard = sorted((tmp_path / "shards").glob("*.array_record"))[1]
    shard.write_bytes(shard.read_bytes()[:5000])
    with pytest.raises(DataError, match=f"shard '{shard}' is corrupt"):
        run(**{"data.train_sources": f"array_record:{tmp_path / 'shards'}"})
    with pytest.raises(ConfigError, match="'model.num_kv_heads'|'model.sliding.num_kv_heads'"):
        run(**{"model.sliding.num_kv_heads": 3})
    with pytest.raises(ConfigError, match="'data.batch_size' = 6: must be divisible by "
                                          "train.grad_accum_steps=4"):
        run(**{"data.batch_size": 6, "train.grad_accum_steps": 4})
    assert not (tmp_path / "wd" / "checkpoints").exists() or not checkpoint_steps(
        tmp_path / "wd")


def test_cli_error_is_one_line(tmp_path, env, micro, corpus_dir):
    overrides = micro.micro_overrides(corpus_dir, **{"data.train_sources": f"text:{tmp_path}/x/*.py"})
    code, _, stderr = finish(start(tmp_path / "wd", overrides, env, micro), timeout=120)
    assert code == 1
    assert stderr.strip().splitlines()[-1] == (
        f"error: text data path '{tmp_path}/x/*.py' matches no files")


def check_bad_token_mid_run_keeps_the_trained_steps(directory, env, micro, corpus_dir):
    documents = [np.full(16, 5 + i, np.int32) for i in range(40)]
    documents[30][3] = 999  # outside the 320-id vocabulary; in the 4th batch of 8 documents
    write_shards(iter(documents), directory / "shards", 8, {"vocab_size": 320})
    overrides = micro.micro_overrides(corpus_dir, **{
        "train.steps": STEPS, "train.eval_every": 12, "data.shuffle": False,
        "data.train_sources": f"array_record:{directory / 'shards'}"})
    code, _, stderr = finish(start(directory / "wd", overrides, env, micro))
    assert code == 1
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("error: reading training batch 4 failed") and "token id 999" in last
    assert last.endswith("checkpoint saved at step 3")
    assert checkpoint_steps(directory / "wd") == [3]


def check_non_finite_losses_stop_the_run(directory, env, micro, corpus_dir):
    overrides = micro.micro_overrides(corpus_dir, **{
        "train.steps": STEPS, "train.eval_every": 0, "train.learning_rate": 1e30,
        "train.warmup_fraction": 0.0, "train.checkpoint_every": 1, "train.max_nan_steps": 3})
    code, _, stderr = finish(start(directory / "wd", overrides, env, micro))
    assert code == 1
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("error: 3 non-finite steps in a row"), stderr[-2000:]
    skipped = [r for r in records(directory / "wd") if r["skipped"]]
    assert len(skipped) == 3
    good = skipped[0]["step"] - 1
    assert checkpoint_steps(directory / "wd")[-1] == good  # nothing saved after the first NaN
    assert last.endswith(f"Last good checkpoint: {directory / 'wd' / 'checkpoints' / str(good)}")


def test_pretrain_end_to_end(tmp_path, env, micro, corpus_dir):
    """Everything that needs the compiled micro-model program, in one test function: the first
    process compiles it into the shared cache and every later one loads it (pytest-xdist would
    otherwise compile it once per worker)."""
    straight, resumed, stdout = straight_and_interrupted_runs(tmp_path / "runs", corpus_dir, env,
                                                              micro)
    check_resume_is_exact(straight, resumed)
    check_run_learns_and_reports_where_things_are(resumed, stdout)
    check_plot_command(resumed, tmp_path / "plot")
    check_checkpoint_of_another_model_is_refused(straight, micro, corpus_dir)
    check_changed_data_stream_is_refused(straight, micro, corpus_dir)
    check_damaged_checkpoint_is_named(straight, micro, corpus_dir, tmp_path / "damaged")
    check_bad_token_mid_run_keeps_the_trained_steps(tmp_path / "bad_token", env, micro,
                                                    corpus_dir)
    check_non_finite_losses_stop_the_run(tmp_path / "nan", env, micro, corpus_dir)
