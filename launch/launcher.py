"""What every launch script shares: its flags, the plan of its jobs, the dry run, the launch.

The scripts (`launch/pretrain.py`, `sft.py`, `mopd.py`, `sweep.py`) differ only in their job
kind. A launch is planned first, without contacting anything: the experiment's id, then per job
(one per sweep point) its image, command, environment, resources, fully resolved config, and
for GKE its Kubernetes manifest. `--dry_run` prints that plan as one JSON document and stops.
Otherwise the plan is carried out by its executor:

  local  Docker present: XManager runs each job in a container built from this repository.
         Docker absent: each job runs as a local process on this machine, and the launcher says so.
  tpu    GKE, a multi-host TPU slice: the image is built and pushed, then one JobSet per job
         (`launch/k8s.py`) is applied with kubectl. The memory plan must fit the slice first.
  gpu    GKE, GPU hosts: the same, with `nvidia.com/gpu` per pod.

XManager's own Kubernetes executor asks for a single pod with no TPU topology, which cannot run
a multi-host slice, so GKE jobs are submitted as JobSets. The experiment's id (XManager's when a
container is launched through it, else a time stamp) is the last part of every job's workdir.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys
import time
from typing import Any, Callable

import ml_collections
from absl import app, flags

from launch import cluster, jobs, k8s
from mimo_jax.ablation import sweep as sweep_lib
from mimo_jax.run_config import load_config

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
EXECUTORS = ("local", "tpu", "gpu")

_EXECUTOR = flags.DEFINE_enum("executor", "local", list(EXECUTORS),
                              "local: this machine (Docker if present); tpu / gpu: GKE.")
_CONFIG = flags.DEFINE_string("config", None, "Run config (or, for sweep.py, the sweep file).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Base directory (gs:// on GKE); the experiment "
                               "id is appended.")
_OVERRIDES = flags.DEFINE_multi_string("override", [], "section.key=value config overrides.")
_POINTS = flags.DEFINE_list("points", [], "sweep.py: only these points (default: all).")
_SLICE = flags.DEFINE_string("slice", None, "tpu: e.g. v5p-512; gpu: e.g. 16xH100.")
_TOPOLOGY = flags.DEFINE_string("topology", None, "tpu: the slice's chip topology, e.g. 8x8x4.")
_IMAGE = flags.DEFINE_string("image", None, "tpu / gpu: registry tag to build and push.")
_BASE_IMAGE = flags.DEFINE_string("base_image", "python:3.11-slim", "Container base image.")
_LOCAL_GPUS = flags.DEFINE_integer("local_gpus", 0, "local: GPUs for the container.")
_PARAM_DTYPE = flags.DEFINE_string("param_dtype", None, "Parameter dtype the memory check uses.")
_SKIP_MEMORY_CHECK = flags.DEFINE_boolean("skip_memory_check", False,
                                          "Launch even if the memory plan does not fit.")
_DRY_RUN = flags.DEFINE_boolean("dry_run", False, "Print the plan as JSON; contact nothing.")
_TITLE = flags.DEFINE_string("title", None, "Experiment title (default: mimo-jax-<kind>).")

# The container extra per executor: what `pip install -e .[extra]` adds in the image.
EXTRAS = {"local": "", "tpu": "tpu", "gpu": "gpu"}


def docker_steps(extra: str, source: str = ".") -> list[str]:
    """Dockerfile steps after FROM: the repository (at `source` in the build context) copied
    whole into /workdir and installed with `extra` ("" for none)."""
    target = f'-e ".[{extra}]"' if extra else "-e ."
    return ["RUN pip install --no-cache-dir --upgrade pip", f"COPY {source} /workdir",
            "WORKDIR /workdir", f"RUN pip install --no-cache-dir {target}"]


def dockerfile(base_image: str, extra: str) -> str:
    """The image's Dockerfile, its build context the repository root."""
    return "\n".join([f"FROM {base_image}"] + docker_steps(extra) + [""])


def experiment_id() -> str:
    """A local experiment id: the launch time, to the second."""
    return time.strftime("%Y%m%d-%H%M%S")


def _k8s_name(title: str, xid: str, index: int | None) -> str:
    """A unique DNS-1035 name (lowercase letters, digits, '-') short enough for the pod names
    JobSet derives from it (`<name>-hosts-0-<host>`, at most 63 characters)."""
    text = "".join(c if c.isalnum() else "-" for c in f"{title}-{xid}".lower()).strip("-")
    return text[:40].rstrip("-") + ("" if index is None else f"-{index}")


def _resolved_configs(kind: str, config: str, overrides: tuple[str, ...], points: list[str]
                      ) -> dict[str | None, ml_collections.ConfigDict]:
    """{point (None for a training job): its fully resolved run config}; a bad config, override
    or point raises ConfigError (a ValueError) before anything is launched."""
    parsed = jobs.parse_overrides(overrides)
    if kind == "sweep":
        return sweep_lib.point_configs(config, points, parsed)
    return {None: load_config(config, parsed)}


def _accelerator(executor: str, slice_name: str | None, topology: str | None
                 ) -> cluster.Accelerator | None:
    if executor == "local":
        return None
    if not slice_name:
        raise ValueError(f"--slice is required with --executor={executor}")
    if executor == "tpu":
        if not topology:
            raise ValueError("--topology is required with --executor=tpu (e.g. 8x8x4)")
        return cluster.tpu_slice(slice_name, topology)
    return cluster.gpu_hosts(slice_name)


def _memory_plan(kind: str, run_config: ml_collections.ConfigDict, point: str | None,
                 accelerator: cluster.Accelerator, param_dtype: str | None, skip: bool) -> str:
    """The memory plan's table; raises ValueError when the job does not fit (unless `skip`)."""
    if kind == "mopd":
        return "not planned: the memory plan covers pretraining-shaped runs"
    try:
        return jobs.check_memory(run_config, accelerator.slice_name, param_dtype)
    except jobs.DoesNotFit as err:
        if not skip:
            raise ValueError(f"sweep point {point!r}: {err}" if point else str(err)) from err
        return f"{err}\n(launched anyway: --skip_memory_check)"


def plan(kind: str, *, executor: str, config: str, workdir: str, overrides: tuple[str, ...] = (),
         points: list[str] | None = None, slice_name: str | None = None,
         topology: str | None = None, image: str | None = None,
         base_image: str = "python:3.11-slim", local_gpus: int = 0,
         param_dtype: str | None = None, skip_memory_check: bool = False,
         title: str | None = None, xid: str | None = None) -> dict[str, Any]:
    """Every job of the launch, as the dry run prints it. Raises ValueError (ConfigError is one)
    for a bad flag, config, override, slice, or a run that does not fit its slice."""
    if executor not in EXECUTORS:
        raise ValueError(f"executor {executor!r} is not one of {EXECUTORS}")
    accelerator = _accelerator(executor, slice_name, topology)
    if accelerator is not None and not image:
        raise ValueError(f"--image (a registry tag to push to) is required with "
                         f"--executor={executor}")
    if kind == "mopd" and accelerator is not None and accelerator.hosts > 1:
        raise ValueError(f"MOPD runs on one host (its rewards read every sampled row there); "
                         f"{accelerator.slice_name} has {accelerator.hosts} hosts (use a "
                         "single-host slice)")
    xid = xid or experiment_id()
    title = title or f"mimo-jax-{kind}"
    resolved = _resolved_configs(kind, config, overrides, list(points or []))
    distributed = accelerator is not None and accelerator.hosts > 1
    base = workdir.rstrip("/") + "/" + xid
    extra = "gpu" if executor == "local" and local_gpus else EXTRAS[executor]
    planned = []
    for index, (point, resolved_config) in enumerate(resolved.items()):
        job = jobs.Job(kind, config, base, tuple(overrides), distributed, point)
        name = _k8s_name(title, xid, index if point else None)
        entry: dict[str, Any] = {
            "name": name, "point": point, "workdir": base + (f"/{point}" if point else ""),
            "image": image or f"(built locally from {base_image})",
            "command": job.command(), "env": {"PYTHONUNBUFFERED": "1"},
            "config": resolved_config.to_dict()}
        if accelerator is None:
            entry["resources"] = {"hosts": 1, "gpus": local_gpus}
        else:
            entry["resources"] = {
                "hosts": accelerator.hosts,
                "per_host": {accelerator.resource: accelerator.devices_per_host},
                "node_selector": accelerator.node_selector}
            entry["memory_plan"] = _memory_plan(kind, resolved_config, point, accelerator,
                                                param_dtype, skip_memory_check)
            entry["manifest"] = k8s.jobset(name, image, job.command(), accelerator, entry["env"],
                                           labels={"experiment": xid, "kind": kind,
                                                   "point": point or ""})
        planned.append(entry)
    return {"experiment": {"title": title, "id": xid, "executor": executor, "kind": kind,
                           "extra": extra, "dockerfile": dockerfile(base_image, extra)},
            "jobs": planned}


def _run_locally(launch: dict[str, Any]) -> None:
    print("Docker is not installed: running each job as a local process on this machine "
          f"(from {REPO_ROOT}), one after another.", flush=True)
    for entry in launch["jobs"]:
        print("$ " + " ".join(entry["command"]), flush=True)
        env = dict(os.environ, **entry["env"])
        command = [sys.executable] + entry["command"][1:]  # this interpreter, not PATH's python
        status = subprocess.run(command, cwd=REPO_ROOT, env=env, check=False).returncode
        if status:
            sys.exit(f"error: job {entry['name']} exited with status {status}")


def _run_in_docker(make_plan: Callable[[str], dict[str, Any]], kind: str, title: str,
                   base_image: str, local_gpus: int) -> None:
    """XManager's local executor: one container per job, the plan made with XManager's id."""
    try:
        # The `xm` extra: only launching through Docker needs XManager, the package never does.
        from xmanager import xm, xm_local  # pylint: disable=import-outside-toplevel
    except ImportError as err:
        raise app.UsageError("Docker is present but XManager is not installed: "
                             "pip install -e '.[xm]'") from err
    requirements = xm.JobRequirements(local_gpu=local_gpus) if local_gpus else \
        xm.JobRequirements()
    with xm_local.create_experiment(experiment_title=title) as experiment:
        launch = make_plan(str(experiment.experiment_id))
        # XManager stages the repository as a folder of its own name in the build context.
        steps = docker_steps(launch["experiment"]["extra"], f"{REPO_ROOT.name}/")
        [executable] = experiment.package([xm.python_container(
            executor_spec=xm_local.Local.Spec(), path=str(REPO_ROOT), base_image=base_image,
            docker_instructions=steps, entrypoint=xm.ModuleName(jobs.ENTRYPOINTS[kind]),
            use_deep_module=True)])
        for entry in launch["jobs"]:
            experiment.add(xm.Job(
                executable=executable, args=entry["command"][3:], env_vars=entry["env"],
                executor=xm_local.Local(requirements=requirements,
                                        experimental_stream_output=True)))
            print(f"job {entry['name']}: workdir {entry['workdir']}")


def _run_on_gke(launch: dict[str, Any]) -> None:
    for tool in ("docker", "kubectl"):
        if shutil.which(tool) is None:
            raise app.UsageError(f"{tool} is not installed; launching on GKE needs docker (to "
                                 "build and push the image) and kubectl (configured for the "
                                 "cluster)")
    image = launch["jobs"][0]["image"]
    dockerfile_text = launch["experiment"]["dockerfile"]
    subprocess.run(["docker", "build", "-t", image, "-f", "-", str(REPO_ROOT)],
                   input=dockerfile_text, text=True, check=True)
    subprocess.run(["docker", "push", image], check=True)
    for entry in launch["jobs"]:
        subprocess.run(["kubectl", "apply", "-f", "-"], input=json.dumps(entry["manifest"]),
                       text=True, check=True)
        print(f"submitted JobSet {entry['name']} ({entry['resources']['hosts']} hosts); "
              f"workdir {entry['workdir']}")


def main_for(kind: str) -> None:
    """The launch script of `kind` (pretrain, sft, mopd, sweep): parses flags and launches."""
    def main(argv: list[str]) -> None:
        if len(argv) > 1:
            raise app.UsageError(f"unexpected arguments: {argv[1:]}")
        if not _CONFIG.value or not _WORKDIR.value:
            raise app.UsageError("--config and --workdir are required")
        if _POINTS.value and kind != "sweep":
            raise app.UsageError("--points belongs to sweep.py")

        def make_plan(xid: str | None = None) -> dict[str, Any]:
            return plan(kind, executor=_EXECUTOR.value, config=_CONFIG.value,
                        workdir=_WORKDIR.value, overrides=tuple(_OVERRIDES.value),
                        points=_POINTS.value, slice_name=_SLICE.value, topology=_TOPOLOGY.value,
                        image=_IMAGE.value, base_image=_BASE_IMAGE.value,
                        local_gpus=_LOCAL_GPUS.value, param_dtype=_PARAM_DTYPE.value,
                        skip_memory_check=_SKIP_MEMORY_CHECK.value, title=_TITLE.value, xid=xid)

        try:
            launch = make_plan()  # every check, before anything is built or started
            if _DRY_RUN.value:
                print(json.dumps(launch, indent=1, default=str))
            elif _EXECUTOR.value != "local":
                _run_on_gke(launch)
            elif shutil.which("docker"):
                _run_in_docker(make_plan, kind, launch["experiment"]["title"], _BASE_IMAGE.value,
                               _LOCAL_GPUS.value)
            else:
                _run_locally(launch)
        except ValueError as err:
            sys.exit(f"error: {err}")

    app.run(main)
