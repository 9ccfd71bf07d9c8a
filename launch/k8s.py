"""The Kubernetes manifest of one multi-host job: a JobSet (jobset.x-k8s.io) of one Indexed Job.

One pod per host, all started together; the JobSet's headless service gives every pod the DNS
name `<name>-hosts-0-<index>.<name>`, so process 0 is the coordinator that every process can
reach. Each pod gets the `jax.distributed` environment the trainers read
(`mimo_jax.parallel.initialize_distributed`): the coordinator's address, the process count, and
its own id, which is the Indexed Job's completion index. A failed pod fails the whole JobSet
(no restarts: a resumed run restarts from its last checkpoint, all hosts together).
"""

from __future__ import annotations

from typing import Any

from launch.cluster import Accelerator

JOBSET_API = "jobset.x-k8s.io/v1alpha2"
REPLICATED_JOB = "hosts"
COORDINATOR_PORT = 8476
COMPLETION_INDEX = "metadata.annotations['batch.kubernetes.io/job-completion-index']"


def pod_env(name: str, accelerator: Accelerator, env: dict[str, str]) -> list[dict[str, Any]]:
    """The container's environment: `env`, then the `jax.distributed` variables."""
    coordinator = f"{name}-{REPLICATED_JOB}-0-0.{name}:{COORDINATOR_PORT}"
    items: list[dict[str, Any]] = [{"name": k, "value": v} for k, v in env.items()]
    items += [{"name": "JAX_COORDINATOR_ADDRESS", "value": coordinator},
              {"name": "JAX_NUM_PROCESSES", "value": str(accelerator.hosts)},
              {"name": "JAX_PROCESS_ID",
               "valueFrom": {"fieldRef": {"fieldPath": COMPLETION_INDEX}}}]
    return items


def jobset(name: str, image: str, command: list[str], accelerator: Accelerator,
           env: dict[str, str], labels: dict[str, str] | None = None) -> dict[str, Any]:
    """The JobSet running `command` in `image` on every host of `accelerator`."""
    devices = {accelerator.resource: accelerator.devices_per_host}
    container = {
        "name": "mimo-jax", "image": image, "imagePullPolicy": "Always",
        "command": command, "env": pod_env(name, accelerator, env),
        "ports": [{"containerPort": COORDINATOR_PORT, "name": "coordinator"}],
        "resources": {"limits": dict(devices), "requests": dict(devices)},
    }
    pod = {"restartPolicy": "Never", "nodeSelector": dict(accelerator.node_selector),
           "containers": [container]}
    job = {"parallelism": accelerator.hosts, "completions": accelerator.hosts,
           "completionMode": "Indexed", "backoffLimit": 0,
           "template": {"metadata": {"labels": dict(labels or {})}, "spec": pod}}
    return {
        "apiVersion": JOBSET_API, "kind": "JobSet",
        "metadata": {"name": name, "labels": dict(labels or {}),
                     # one slice's node pool per JobSet: the pods never spread across slices
                     "annotations": {"alpha.jobset.sigs.k8s.io/exclusive-topology":
                                     "cloud.google.com/gke-nodepool"}},
        "spec": {"failurePolicy": {"maxRestarts": 0},
                 "network": {"enableDNSHostnames": True},
                 "replicatedJobs": [{"name": REPLICATED_JOB, "replicas": 1,
                                     "template": {"spec": job}}]},
    }
