r"""XManager launch script for pretraining, on this machine or on a TPU pod slice.

Needs the `xm` extra (`pip install -e ".[xm]"`) and Docker. Examples:

    # A container on this machine (the tiny config on CPU, or local GPUs):
    xmanager launch launch/pretrain.py -- --executor=local \
        --config=configs/tiny.py --workdir=/tmp/mimo_tiny --override=train.steps=50

    # A v5p-512 slice on GKE (one pod per TPU host, `jax.distributed` across them). The run's
    # per-device memory is checked first; the job is not queued if it does not fit:
    xmanager launch launch/pretrain.py -- --executor=tpu --slice=v5p-512 --topology=8x8x4 \
        --config=configs/mimo_v2_flash.py --workdir=gs://BUCKET/mimo/run1 \
        --image_tag=gcr.io/PROJECT/mimo-jax:latest

Every `--override=section.key=value` becomes `--config.section.key=value` of
`python -m mimo_jax.train.pretrain`.
"""

from __future__ import annotations

import os
import sys

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from launch import jobs  # noqa: E402  (needs the repository root on the path)

_EXECUTOR = flags.DEFINE_enum("executor", "local", ["local", "tpu"],
                              "local: Docker on this machine; tpu: a GKE TPU slice.")
_CONFIG = flags.DEFINE_string("config", "configs/tiny.py", "Run config, relative to the repo.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints and logs (gs:// on TPU).")
_OVERRIDES = flags.DEFINE_multi_string("override", [], "section.key=value config overrides.")
_SLICE = flags.DEFINE_string("slice", "v5p-512", "TPU slice name (tpu executor).")
_TOPOLOGY = flags.DEFINE_string("topology", "8x8x4", "Physical chip topology (tpu executor).")
_PARAM_DTYPE = flags.DEFINE_string("param_dtype", None,
                                   "Parameter dtype assumed by the memory check.")
_SKIP_MEMORY_CHECK = flags.DEFINE_boolean("skip_memory_check", False,
                                          "Queue the TPU job even if the plan says it won't fit.")
_BASE_IMAGE = flags.DEFINE_string("base_image", "python:3.11-slim", "Container base image.")
_IMAGE_TAG = flags.DEFINE_string("image_tag", None, "Registry tag to push the image to (tpu).")
_TPU_RUNTIME = flags.DEFINE_string("tpu_runtime", "tpu-ubuntu2204-base", "TPU software version.")
_LOCAL_GPUS = flags.DEFINE_integer("local_gpus", 0, "GPUs for the local container.")
_TITLE = flags.DEFINE_string("title", "mimo-jax-pretrain", "Experiment title.")


def _docker_instructions(extra: str) -> list[str]:
    """Copies the repository into the image and installs it with `extra` (e.g. "tpu")."""
    root = os.path.basename(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    return ["RUN pip install --no-cache-dir --upgrade pip",
            f"COPY {root}/ /workdir",
            "WORKDIR /workdir",
            f'RUN pip install --no-cache-dir -e ".[{extra}]"' if extra else
            "RUN pip install --no-cache-dir -e ."]


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not _WORKDIR.value:
        raise app.UsageError("--workdir is required")
    try:
        # The `xm` extra: only the launcher needs XManager, the package never does.
        from xmanager import xm, xm_local  # pylint: disable=import-outside-toplevel
    except ImportError as err:
        raise app.UsageError("XManager is not installed: pip install -e '.[xm]'") from err

    on_tpu = _EXECUTOR.value == "tpu"
    job = jobs.PretrainJob(config=_CONFIG.value, workdir=_WORKDIR.value,
                           overrides=tuple(_OVERRIDES.value), distributed=on_tpu)
    if on_tpu:
        try:
            request = jobs.tpu_request(_SLICE.value, _TOPOLOGY.value)
            if not _SKIP_MEMORY_CHECK.value:
                print(jobs.check_memory(_CONFIG.value, job.overrides, _SLICE.value,
                                        _PARAM_DTYPE.value))
        except ValueError as err:
            raise app.UsageError(str(err)) from err
        executor = xm_local.Kubernetes(
            requirements=xm.JobRequirements({request.resource: request.topology}),
            tpu_capability=xm_local.TpuCapability(tpu_runtime_version=_TPU_RUNTIME.value))
        spec = xm_local.Kubernetes.Spec(push_image_tag=_IMAGE_TAG.value)
        extra = "tpu"
    else:
        requirements = (xm.JobRequirements(local_gpu=_LOCAL_GPUS.value) if _LOCAL_GPUS.value
                        else xm.JobRequirements())
        executor = xm_local.Local(requirements=requirements, experimental_stream_output=True)
        spec = xm_local.Local.Spec()
        extra = "gpu" if _LOCAL_GPUS.value else ""
    print("command:", " ".join(job.command()))

    with xm_local.create_experiment(experiment_title=_TITLE.value) as experiment:
        [executable] = experiment.package([xm.python_container(
            executor_spec=spec, path=".", base_image=_BASE_IMAGE.value,
            docker_instructions=_docker_instructions(extra),
            entrypoint=xm.ModuleName(jobs.ENTRYPOINT), use_deep_module=True)])
        experiment.add(xm.Job(executable=executable, executor=executor, args=job.args()))


if __name__ == "__main__":
    app.run(main)
