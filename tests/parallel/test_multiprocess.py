"""Two processes on localhost (4 CPU devices each, coordinator on 127.0.0.1) take sharded steps
of the real train step on a hybrid mesh (data across processes, fsdp x expert within) and match
one device running the same steps. The test owns both processes: bounded waits, always killed."""

import json
import os
import pathlib
import socket
import subprocess
import sys
import time

import jax
import numpy as np

import parallel_helpers as ph

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parents[1]
TIMEOUT_S = 240  # a normal run takes well under a minute


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _run_workers(out_path: pathlib.Path, num_processes: int = 2) -> list[str]:
    """Starts the workers and waits for all; on a failure or the deadline kills the rest."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(HERE.parent), str(HERE)]))
    env.pop("XLA_FLAGS", None)
    port = _free_port()
    procs = [subprocess.Popen(
        [sys.executable, str(HERE / "multiprocess_worker.py"), str(i), str(num_processes),
         str(port), str(out_path)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for i in range(num_processes)]
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while any(p.poll() is None for p in procs):
            if any(p.poll() not in (None, 0) for p in procs) or time.monotonic() > deadline:
                break
            time.sleep(0.2)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        logs = [p.communicate(timeout=30)[0] for p in procs]
    codes = [p.returncode for p in procs]
    assert codes == [0] * num_processes, (
        f"workers exited with {codes}:\n" + "\n----\n".join(log[-3000:] for log in logs))
    return logs


def test_two_processes_match_one_device(tmp_path):
    out_path = tmp_path / "result.json"
    _run_workers(out_path)
    result = json.loads(out_path.read_text())
    assert result["mesh"] == dict(data=2, fsdp=2, expert=2, context=1, tensor=1)

    _, step, state, batch, schedule = ph.train_setup("dense", **ph.SMALL)
    step = jax.jit(step, compiler_options=ph.QUICK_COMPILE)
    want = []
    for i in range(len(result["metrics"])):
        state, metrics = step(state, batch, schedule(i))
        want.append({k: float(metrics[k]) for k in ("loss", "grad_norm")})
    for got, ref in zip(result["metrics"], want):
        for key in ("loss", "grad_norm"):
            assert abs(got[key] - ref[key]) <= 1e-5 * abs(ref[key]), (key, got, ref)
    norms = np.asarray(jax.jit(ph.param_norms)(state.params))
    np.testing.assert_allclose(result["param_norms"], norms, rtol=1e-5)
