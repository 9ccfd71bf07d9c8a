"""The launch scripts: their dry runs read back as JSON, their checks, and a real local launch."""

import json
import os
import pathlib
import subprocess
import sys

import jax
import pytest

from launch import cluster, jobs, launcher

REPO = pathlib.Path(__file__).resolve().parents[2]


def _dry_runs(*commands: list[str]) -> list[dict]:
    """Runs the launch scripts' dry runs side by side; each one's stdout parsed as JSON."""
    processes = [subprocess.Popen([sys.executable, *command, "--dry_run"], cwd=REPO,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for command in commands]
    plans = []
    for process in processes:
        out, err = process.communicate(timeout=300)
        assert process.returncode == 0, err[-2000:]
        plans.append(json.loads(out))
    return plans


def _env(manifest: dict) -> dict:
    [replicated] = manifest["spec"]["replicatedJobs"]
    [container] = replicated["template"]["spec"]["template"]["spec"]["containers"]
    return {item["name"]: item.get("value", item.get("valueFrom")) for item in container["env"]}


def test_dry_runs_of_a_v5p_512_pretraining_an_mopd_job_and_a_six_point_sweep():
    pretrain, mopd, sweep = _dry_runs(
        ["launch/pretrain.py", "--executor=tpu", "--slice=v5p-512", "--topology=8x8x4",
         "--config=configs/mimo_v2_flash.py", "--workdir=gs://bucket/mimo",
         "--image=gcr.io/p/mimo:1", "--override=train.steps=100"],
        ["launch/mopd.py", "--executor=gpu", "--slice=1xH200", "--workdir=gs://bucket/mopd",
         "--config=configs/mopd_mimo_v2_flash.py", "--image=gcr.io/p/mimo:1",
         "--override=init_from=gs://bucket/sft/export"],
        ["launch/sweep.py", "--executor=gpu", "--slice=16xH100", "--image=gcr.io/p/mimo:1",
         "--config=configs/ablations/attention.py", "--workdir=gs://bucket/ablate",
         "--override=mesh.dcn=data=-1"])  # the 2 hosts split the batch

    xid = pretrain["experiment"]["id"]
    [job] = pretrain["jobs"]
    assert job["command"] == ["python", "-m", "mimo_jax.train.pretrain",
                              "--config=configs/mimo_v2_flash.py",
                              f"--workdir=gs://bucket/mimo/{xid}", "--distributed",
                              "--config.train.steps=100"]
    assert job["config"]["train"]["steps"] == 100  # the resolved config, override applied
    assert job["config"]["model"]["num_experts"] == 256
    assert "fits" in job["memory_plan"]
    assert 'COPY . /workdir' in pretrain["experiment"]["dockerfile"]
    manifest = job["manifest"]
    assert manifest["kind"] == "JobSet"
    [replicated] = manifest["spec"]["replicatedJobs"]
    indexed = replicated["template"]["spec"]
    assert (replicated["replicas"], indexed["parallelism"], indexed["completions"],
            indexed["completionMode"]) == (1, 64, 64, "Indexed")  # 64 hosts x 4 chips
    pod = indexed["template"]["spec"]
    assert pod["nodeSelector"] == {"cloud.google.com/gke-tpu-accelerator": "tpu-v5p-slice",
                                   "cloud.google.com/gke-tpu-topology": "8x8x4"}
    [container] = pod["containers"]
    assert container["resources"]["limits"] == {"google.com/tpu": 4}
    assert container["image"] == "gcr.io/p/mimo:1"
    assert container["command"] == job["command"]
    env = _env(manifest)
    assert env["JAX_NUM_PROCESSES"] == "64"
    assert env["JAX_COORDINATOR_ADDRESS"].startswith(f"{manifest['metadata']['name']}-hosts-0-0.")
    assert "job-completion-index" in env["JAX_PROCESS_ID"]["fieldRef"]["fieldPath"]

    [job] = mopd["jobs"]
    assert job["command"][:3] == ["python", "-m", "mimo_jax.train.mopd"]
    assert "--distributed" not in job["command"]  # one host
    assert job["config"]["init_from"] == "gs://bucket/sft/export"
    assert job["resources"]["per_host"] == {"nvidia.com/gpu": 1}
    [replicated] = job["manifest"]["spec"]["replicatedJobs"]
    assert replicated["template"]["spec"]["parallelism"] == 1
    assert replicated["template"]["spec"]["template"]["spec"]["nodeSelector"] == {
        "cloud.google.com/gke-accelerator": "nvidia-h200-141gb"}

    xid = sweep["experiment"]["id"]
    points = [job["point"] for job in sweep["jobs"]]
    assert points == ["window_small_sinks", "window_small_no_sinks", "window_large_sinks",
                      "window_large_no_sinks", "hybrid_3to1", "all_global"]
    assert len({job["name"] for job in sweep["jobs"]}) == 6
    for job in sweep["jobs"]:  # one JobSet per point: 2 hosts x 8 GPUs, jax.distributed
        assert job["command"] == ["python", "-m", "mimo_jax.ablate",
                                  "--sweep=configs/ablations/attention.py",
                                  f"--points={job['point']}", f"--workdir=gs://bucket/ablate/{xid}",
                                  "--distributed", "--override=mesh.dcn=data=-1"]
        assert job["workdir"] == f"gs://bucket/ablate/{xid}/{job['point']}"
        assert job["resources"]["per_host"] == {"nvidia.com/gpu": 8}
        [replicated] = job["manifest"]["spec"]["replicatedJobs"]
        assert replicated["template"]["spec"]["parallelism"] == 2
        assert replicated["template"]["spec"]["template"]["spec"]["nodeSelector"] == {
            "cloud.google.com/gke-accelerator": "nvidia-h100-80gb"}
        assert _env(job["manifest"])["JAX_NUM_PROCESSES"] == "2"
        assert "fits" in job["memory_plan"]
    windows = {job["point"]: job["config"]["model"]["sliding"]["sliding_window"]
               for job in sweep["jobs"]}
    assert windows["window_small_sinks"] == 9 and windows["window_large_sinks"] == 33


def test_plans_refuse_bad_launches_before_anything_starts():
    def plan(kind="pretrain", **kwargs):
        args = dict(executor="tpu", config="configs/tiny.py", workdir="/w", slice_name="v5p-8",
                    topology="2x2x1", image="x:1")
        args.update(kwargs)
        return launcher.plan(kind, **args)

    with pytest.raises(ValueError, match="has 128 chips but v5p-512"):
        plan(slice_name="v5p-512", topology="4x8x4")
    with pytest.raises(ValueError, match="--topology is required"):
        plan(topology=None)
    with pytest.raises(ValueError, match="--image"):
        plan(image=None)
    with pytest.raises(ValueError, match="does not fit v5p-512"):  # one micro-batch is too big
        plan(config="configs/mimo_v2_flash.py", slice_name="v5p-512", topology="8x8x4",
             overrides=("train.grad_accum_steps=1",))
    with pytest.raises(ValueError, match="64 hosts"):
        plan("mopd", config="configs/mopd_tiny.py", slice_name="v5p-512", topology="8x8x4")
    with pytest.raises(ValueError, match="unknown sweep point"):
        plan("sweep", executor="local", config="configs/ablations/mtp.py", points=["mtp_9"])
    with pytest.raises(ValueError, match="train.stepz"):
        plan(executor="local", overrides=("train.stepz=3",))
    with pytest.raises(ValueError, match="'steps' does not exist"):
        plan(executor="local", overrides=("steps=3",))
    with pytest.raises(ValueError, match="is not 'section.key=value'"):
        jobs.parse_overrides(["train.steps"])
    assert plan(slice_name="v5p-8", topology="2x2x1")["jobs"][0]["resources"]["hosts"] == 1


def test_slices_as_hosts_and_devices():
    v5p = cluster.tpu_slice("v5p-512", "8x8x4")
    assert (v5p.hosts, v5p.devices_per_host, v5p.devices) == (64, 4, 256)
    v5e = cluster.tpu_slice("v5e-8", "2x4")
    assert (v5e.hosts, v5e.devices_per_host) == (1, 8)
    gpus = cluster.gpu_hosts("64xH100")
    assert (gpus.hosts, gpus.devices_per_host, gpus.resource) == (8, 8, "nvidia.com/gpu")
    with pytest.raises(ValueError, match="not a TPU slice"):
        cluster.tpu_slice("8xH100", "2x4")


def test_a_local_launch_of_the_tiny_config_trains_and_checkpoints(tmp_path, micro, corpus_dir):
    overrides = micro.micro_overrides(corpus_dir, **{"train.steps": 4, "train.checkpoint_every": 2,
                                               "train.eval_every": 0, "data.eval_batches": 0})
    flags = [f"--override={key}={value}" for key, value in overrides.items()]
    # No docker on PATH: the launcher runs the job as a local process, and says so.
    # One CPU device and the lowest backend optimisation level (these programs compile twice as
    # fast), sharing the suite's compilation cache.
    env = dict(os.environ, PATH=os.path.dirname(sys.executable),
               XLA_FLAGS="--xla_backend_optimization_level=0",
               JAX_COMPILATION_CACHE_DIR=jax.config.jax_compilation_cache_dir)
    result = subprocess.run(
        [sys.executable, "launch/pretrain.py", "--config=configs/tiny.py",
         f"--workdir={tmp_path}", *flags], cwd=REPO, env=env, capture_output=True, text=True,
        timeout=600, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "running each job as a local process" in result.stdout
    [run_dir] = [p for p in tmp_path.iterdir() if p.is_dir()]  # <workdir>/<experiment id>
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["2", "4"]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2, 3, 4]
