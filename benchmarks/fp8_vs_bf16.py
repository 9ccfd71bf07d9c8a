r"""The tiny model trained in FP8 against bf16: the same run twice, loss curves side by side.

    python benchmarks/fp8_vs_bf16.py --workdir runs/fp8_vs_bf16 --steps 60
    python benchmarks/fp8_vs_bf16.py --workdir runs/fp8_vs_bf16 --reuse  # table and plot again

Runs the project's pretraining trainer (`python -m mimo_jax.train.pretrain --config
configs/tiny.py`) with compute dtype bfloat16, once with `--config.model.fp8=false` and once with
`--config.model.fp8=true`, same seed and data, no evaluation or checkpoints in between. Prints a
markdown table of the training loss (next-token CE) at a few steps, the largest relative
difference over every logged step, the held-out loss at the end and the wall time of each run; draws both curves to
docs/fp8_vs_bf16.png. On CPU the FP8 run is an emulation (`mimo_jax/ops/fp8`): its time says
nothing about an accelerator's FP8 speed, only its losses matter.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import subprocess
import sys
import time

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mimo_jax.train.metrics import read_metrics  # noqa: E402

RUNS = {"bf16": "false", "fp8": "true"}


def train(workdir: pathlib.Path, fp8: str, steps: int, log_every: int) -> float:
    """One trainer run; returns its wall seconds."""
    command = [sys.executable, "-m", "mimo_jax.train.pretrain", "--config", "configs/tiny.py",
               "--workdir", str(workdir), f"--config.model.fp8={fp8}",
               "--config.model.runtime.dtype=bfloat16", f"--config.train.steps={steps}",
               f"--config.train.log_every={log_every}",
               # Only the training curve is compared: no evaluation, checkpoint or plot on the way.
               f"--config.train.eval_every={10 * steps}",
               f"--config.train.checkpoint_every={10 * steps}",
               "--config.train.tensorboard=false", "--config.train.plot=false",
               "--config.train.progress=log"]
    start = time.perf_counter()
    subprocess.run(command, cwd=ROOT, check=True,
                   env={**os.environ, "PYTHONPATH": str(ROOT)})
    return time.perf_counter() - start


def losses(workdir: pathlib.Path, kind: str = "train", key: str = "ce") -> dict[int, float]:
    """step -> the `key` of the run's `kind` records (training next-token CE by default)."""
    return {r["step"]: r[key] for r in read_metrics(workdir) if r.get("kind") == kind}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default="runs/fp8_vs_bf16")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--log_every", type=int, default=5)
    parser.add_argument("--plot", default=str(ROOT / "docs" / "fp8_vs_bf16.png"))
    parser.add_argument("--reuse", action="store_true",
                        help="read the two runs already in --workdir instead of training")
    args = parser.parse_args()
    root = pathlib.Path(args.workdir)
    seconds, curves, held_out = {}, {}, {}
    for name, fp8 in RUNS.items():
        workdir = root / name
        if (workdir / "metrics.jsonl").exists() and not args.reuse:
            raise SystemExit(f"{workdir} holds a run already; pick a fresh --workdir or --reuse")
        if not args.reuse:
            seconds[name] = train(workdir, fp8, args.steps, args.log_every)
        curves[name] = losses(workdir)
        held_out[name] = losses(workdir, "eval", "loss")

    steps = sorted(set(curves["bf16"]) & set(curves["fp8"]))
    relative = {s: abs(curves["fp8"][s] - curves["bf16"][s]) / curves["bf16"][s] for s in steps}
    shown = sorted({steps[0], *steps[len(steps) // 4::len(steps) // 4 or 1], steps[-1]})
    print("| step | bf16 CE | fp8 CE | relative difference |")
    print("|---:|---:|---:|---:|")
    for s in shown:
        print(f"| {s} | {curves['bf16'][s]:.4f} | {curves['fp8'][s]:.4f} | {relative[s]:.2%} |")
    worst = max(relative, key=relative.get)
    timing = ("wall time not measured (--reuse)" if args.reuse else
              f"wall time bf16 {seconds['bf16']:.0f} s, fp8 {seconds['fp8']:.0f} s (CPU emulation)")
    print(f"\nlargest relative difference over {len(steps)} logged steps: {relative[worst]:.2%} "
          f"(step {worst}); {timing}")
    last = max(held_out["bf16"])
    print(f"held-out loss at step {last}: bf16 {held_out['bf16'][last]:.4f}, "
          f"fp8 {held_out['fp8'][last]:.4f}")

    fig, ax = plt.subplots(figsize=(7, 4))
    for name in RUNS:
        ax.plot(steps, [curves[name][s] for s in steps], label=f"{name}")
    ax.set(title="tiny model, bf16 compute: plain GEMMs vs FP8 (e4m3, block-scaled)",
           xlabel="step", ylabel="training next-token CE")
    ax.legend()
    fig.tight_layout()
    pathlib.Path(args.plot).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.plot, dpi=120)
    print(f"wrote {args.plot}")


if __name__ == "__main__":
    main()
