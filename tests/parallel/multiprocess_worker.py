"""One process of the two-process test (`test_multiprocess.py`); not a test itself.

    python multiprocess_worker.py PROCESS_ID NUM_PROCESSES PORT OUT.json

Joins the run through a coordinator on 127.0.0.1:PORT, builds the hybrid mesh (data across the
processes, fsdp x expert within each), puts the shared initial train state and this process's
rows of the batch on it, takes a few steps of the real train step, and (process 0) writes the
metrics and parameter norms to OUT.json.
"""

import json
import os
import sys

os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"

import jax  # noqa: E402  (after the environment set-up)

jax.config.update("jax_default_matmul_precision", "highest")

import parallel_helpers as ph  # noqa: E402
from mimo_jax.parallel import (Parallelism, initialize_distributed,  # noqa: E402
                               mesh_config_from_dict)

STEPS = 3
MESH = dict(ici="fsdp=2,expert=2", dcn="data=2", rules="fsdp_ep")


def main() -> None:
    process_id, num_processes, port, out_path = (int(sys.argv[1]), int(sys.argv[2]),
                                                 int(sys.argv[3]), sys.argv[4])
    initialize_distributed(f"127.0.0.1:{port}", num_processes, process_id,
                           initialization_timeout=60, heartbeat_timeout_seconds=30,
                           shutdown_timeout_seconds=30)
    assert jax.process_count() == num_processes and jax.device_count() == 4 * num_processes
    parallelism = Parallelism.from_config(mesh_config_from_dict(MESH))
    model, step_fn, state, batch, schedule = ph.train_setup("expert_parallel", **ph.SMALL)
    _, param_shardings = parallelism.param_shardings(model)
    state_shardings = parallelism.state_shardings(state, state.params, param_shardings)
    state = jax.tree.map(
        lambda x, s: jax.make_array_from_callback(x.shape, s, lambda index, x=x: x[index]),
        state, state_shardings)
    rows = batch["tokens"].shape[0] // num_processes
    local = {k: v[process_id * rows:(process_id + 1) * rows] for k, v in batch.items()}
    batch_shardings = parallelism.batch_shardings(local)
    step = parallelism.jit_train_step(step_fn, state_shardings, batch_shardings, extra_args=1,
                                      compiler_options=ph.QUICK_COMPILE)
    metrics = []
    for i in range(STEPS):
        state, out = step(state, parallelism.put_batch(local, batch_shardings), schedule(i))
        metrics.append({k: float(out[k]) for k in ("loss", "grad_norm")})
    norms = parallelism.jit(ph.param_norms, (state_shardings.params,), parallelism.replicated)(
        state.params)
    if process_id == 0:
        with open(out_path, "w", encoding="utf-8") as f:
            json.dump({"metrics": metrics, "param_norms": [float(n) for n in norms],
                       "mesh": {k: int(v) for k, v in parallelism.mesh.shape.items()}}, f)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main()
