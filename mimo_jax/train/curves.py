"""Draws a run's loss curves to PNG (what `python -m mimo_jax.train.plot` and the trainer call).

Left: training loss (total and next-token cross-entropy, MTP loss when present) per step.
Right: evaluation loss and perplexity at each evaluation.

The figure is drawn through matplotlib's object API (`Figure`), not `pyplot`: it needs no
backend choice, so importing this module never changes the backend of a notebook that has one.
"""

from __future__ import annotations

import pathlib

from matplotlib.figure import Figure

from mimo_jax.train.metrics import read_metrics

PLOT_FILE = "loss.png"


def _series(records: list[dict], kind: str, key: str) -> tuple[list[int], list[float]]:
    steps, values = [], []
    for record in records:
        value = record.get(key)
        if record.get("kind") == kind and isinstance(value, (int, float)):
            steps.append(int(record["step"]))
            values.append(float(value))
    return steps, values


def plot_metrics(workdir: str | pathlib.Path, out: str | pathlib.Path | None = None
                 ) -> pathlib.Path:
    """Writes the PNG and returns its path. Raises FileNotFoundError when there is no log."""
    workdir = pathlib.Path(workdir)
    records = read_metrics(workdir)
    if not records:
        raise FileNotFoundError(f"no metrics in {workdir / 'metrics.jsonl'}: is {workdir} a "
                                "training workdir?")
    out = pathlib.Path(out) if out else workdir / PLOT_FILE
    fig = Figure(figsize=(12, 4.5))
    train_ax, eval_ax = fig.subplots(1, 2)
    for key, label in (("loss", "total loss"), ("ce", "next-token CE"), ("mtp", "MTP CE")):
        steps, values = _series(records, "train", key)
        if steps and any(values):
            train_ax.plot(steps, values, label=label, linewidth=1)
    train_ax.set(title="training", xlabel="step", ylabel="loss")
    train_ax.legend()
    train_ax.grid(alpha=0.3)
    steps, values = _series(records, "eval", "loss")
    if steps:
        eval_ax.plot(steps, values, "o-", label="eval loss (next-token CE)")
        ppl_ax = eval_ax.twinx()
        ppl_steps, ppl = _series(records, "eval", "perplexity")
        ppl_ax.plot(ppl_steps, ppl, "s--", color="tab:red", alpha=0.6, label="perplexity")
        ppl_ax.set_ylabel("perplexity")
        ppl_ax.set_yscale("log")
        eval_ax.legend(loc="upper right")
    else:
        eval_ax.text(0.5, 0.5, "no evaluation yet", ha="center", va="center",
                     transform=eval_ax.transAxes)
    eval_ax.set(title="evaluation", xlabel="step", ylabel="loss")
    eval_ax.grid(alpha=0.3)
    fig.suptitle(str(workdir))
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    return out

