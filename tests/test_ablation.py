"""Ablation sweeps: the report's sweep files, running a sweep, and its comparison table."""

import json
import subprocess
import sys
import textwrap

import pytest

from configs.ablations import points
from mimo_jax.ablation import sweep as sweep_lib
from mimo_jax.ablation import table as table_lib
from mimo_jax.config import GA, SWA, ConfigError, model_config_from_dict
from mimo_jax.train import trainer


@pytest.mark.parametrize("path, expected", [
    ("configs/ablations/attention.py", ["window_small_sinks", "window_small_no_sinks",
                                        "window_large_sinks", "window_large_no_sinks",
                                        "hybrid_3to1", "all_global"]),
    ("configs/ablations/mtp.py", ["mtp_0", "mtp_1", "mtp_3"]),
    ("configs/ablations/moe.py", ["moe", "dense"])])
def test_sweep_files_build_valid_configs_that_differ_as_named(path, expected):
    configs = sweep_lib.point_configs(path)
    assert list(configs) == expected
    models = {name: trainer.build_configs(c).model for name, c in configs.items()}
    if "attention" in path:
        base = models["window_small_sinks"]
        assert base.layer_types.count(GA) == 2 and base.sliding.sliding_window == 9
        assert base.sliding.attention_sink and not models["window_small_no_sinks"].sliding.attention_sink
        assert models["window_large_sinks"].sliding.sliding_window == 33
        assert models["hybrid_3to1"].layer_types == (GA, SWA, SWA, GA, SWA, SWA, SWA, GA)
        assert set(models["all_global"].layer_types) == {GA}
    elif "mtp" in path:
        assert [m.num_mtp_heads for m in models.values()] == [0, 1, 3]
    else:
        dense, moe = models["dense"], models["moe"]
        assert set(dense.mlp_types) == {"dense"} and "moe" in moe.mlp_types
        assert dense.dense_intermediate_size == moe.num_experts_per_token * moe.moe_intermediate_size


def test_bad_sweeps_and_overrides_are_named(tmp_path):
    with pytest.raises(ConfigError, match="unknown sweep point"):
        sweep_lib.point_configs("configs/ablations/mtp.py", ["mtp_2"])
    with pytest.raises(ConfigError, match="sweep point 'mtp_0'.*train.stepz"):
        sweep_lib.point_configs("configs/ablations/mtp.py", None, {"train.stepz": "3"})
    bad = tmp_path / "bad.py"
    bad.write_text("def get_sweep():\n    return {'a b': None}\n")
    with pytest.raises(ConfigError, match="point name 'a b'"):
        sweep_lib.load_sweep(bad)
    with pytest.raises(ConfigError, match="no get_sweep"):
        sweep_lib.load_sweep("configs/tiny.py")


def test_kv_values_per_token_counts_global_layers_whole_and_sliding_ones_by_window():
    config = trainer.build_configs(points.base()).model
    full, sliding = config.full, config.sliding
    per_ga = full.num_kv_heads * (full.qk_head_dim + full.v_head_dim)
    per_swa = sliding.num_kv_heads * (sliding.qk_head_dim + sliding.v_head_dim)
    expected = 2 * per_ga + 6 * per_swa * 33 / 128
    assert table_lib.kv_values_per_token(config, 128) == pytest.approx(expected, rel=1e-12)
    assert table_lib.kv_values_per_token(config, 16) == pytest.approx(2 * per_ga + 6 * per_swa)


def test_a_sweep_trains_each_point_resumes_and_tabulates(tmp_path, micro, corpus_dir):
    overrides = micro.micro_overrides(corpus_dir, **{
        "train.steps": 2, "train.checkpoint_every": 2, "train.eval_every": 2,
        "train.tensorboard": False, "train.plot": False, "train.export_params": False})
    del overrides["data.tokenizer"]  # the first point trains one, the second reuses it
    sweep_file = tmp_path / "micro_sweep.py"
    # Two points that differ in learning rate only: one compiled program serves both.
    sweep_file.write_text(textwrap.dedent(f"""
        from configs import tiny
        OVERRIDES = {overrides!r}

        def get_sweep():
            def point(learning_rate):
                config = tiny.get_config()
                config.update_from_flattened_dict(OVERRIDES)
                config.train.learning_rate = learning_rate
                return config
            return {{"slow": point(1e-3), "fast": point(1e-2)}}
    """))
    workdir = tmp_path / "sweep"
    logs = []
    done = sweep_lib.run_sweep(sweep_file, workdir, log=logs.append)
    assert [p.name for p in done] == ["slow", "fast"]
    assert sweep_lib.finished(workdir / "fast", 2) and not sweep_lib.finished(workdir / "fast", 3)
    fast_config = json.loads((workdir / "fast/config.json").read_text())
    assert fast_config["data"]["tokenizer"] == str(workdir / "slow/tokenizer.json")
    again = []
    sweep_lib.run_sweep(sweep_file, workdir, log=again.append)
    assert again == ["[1/2] slow: finished earlier, kept", "[2/2] fast: finished earlier, kept"]

    text, plot = table_lib.write_table(workdir)
    rows = table_lib.collect(workdir)
    assert [row.name for row in rows] == ["slow", "fast"]
    model = model_config_from_dict(fast_config["model"])
    for row in rows:
        evals = [json.loads(line) for line in (workdir / row.name / "metrics.jsonl")
                 .read_text().splitlines() if '"eval"' in line]
        assert row.eval_loss == evals[-1]["loss"] and row.steps == 2
        assert row.tokens_per_sec > 0
        assert row.kv_values_per_token == table_lib.kv_values_per_token(model, 32)
    assert rows[0].params == rows[1].params
    assert rows[0].eval_loss != rows[1].eval_loss
    assert text.splitlines()[2].startswith("| slow | 2 |") and "+0.0000" in text
    assert plot.stat().st_size > 10_000 and (workdir / table_lib.TABLE_FILE).read_text() == text


def test_ablate_command_lists_points_and_names_bad_input():
    def ablate(*args):
        return subprocess.run([sys.executable, "-m", "mimo_jax.ablate", *args],
                              capture_output=True, text=True, timeout=120, check=False)

    listed = ablate("--sweep=configs/ablations/mtp.py", "--list")
    assert listed.returncode == 0 and listed.stdout.split() == ["mtp_0", "mtp_1", "mtp_3"]
    bad = ablate("--sweep=configs/ablations/mtp.py", "--points=mtp_7", "--workdir=/tmp/x")
    assert bad.returncode == 1
    assert bad.stderr.strip().splitlines()[-1].startswith("error: unknown sweep point(s) 'mtp_7'")
    with pytest.raises(FileNotFoundError, match="no trained sweep points"):
        table_lib.collect("/nonexistent/sweep")
