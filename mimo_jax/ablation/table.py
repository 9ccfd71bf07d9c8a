"""A sweep's comparison: one row per trained point, as a markdown table and one PNG of bars.

Columns: the final eval loss (next-token cross-entropy on held-out batches; MTP heads are not in
it), training throughput (median tokens/s over the logged steps, the first step's compilation
excluded by the trainer), total and active parameters (MTP heads excluded, as in
`mimo_jax.summary`), and the KV cache a decoded token costs, in stored values, at the run's
training length L: each global layer keeps every token's keys and values, each sliding layer only
its window, so its share per token is min(window, L) / L.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import statistics

from matplotlib.figure import Figure

from mimo_jax.ablation.sweep import SWEEP_FILE
from mimo_jax.config import ModelConfig, model_config_from_dict
from mimo_jax.model.param_count import count_parameters
from mimo_jax.train.metrics import read_metrics
from mimo_jax.train.trainer import CONFIG_FILE

TABLE_FILE = "ablation.md"
PLOT_FILE = "ablation.png"


@dataclasses.dataclass(frozen=True)
class PointRow:
    """One trained point of a sweep."""

    name: str
    steps: int
    eval_loss: float | None
    tokens_per_sec: float | None
    params: int
    active_params: int
    kv_values_per_token: float
    context: int


def kv_values_per_token(config: ModelConfig, context: int) -> float:
    """Keys and values stored per decoded token at `context` tokens, summed over the layers."""
    total = 0.0
    for layer_type in config.layer_types:
        attention = config.attention(layer_type)
        per_token = attention.num_kv_heads * (attention.qk_head_dim + attention.v_head_dim)
        window = attention.sliding_window
        total += per_token * (min(window, context) / context if window else 1.0)
    return total


def point_row(workdir: str | pathlib.Path) -> PointRow:
    """The row of one point's training workdir (its config.json and metrics.jsonl)."""
    workdir = pathlib.Path(workdir)
    config = json.loads((workdir / CONFIG_FILE).read_text())
    model = model_config_from_dict(config["model"])
    records = read_metrics(workdir)
    train = [r for r in records if r.get("kind") == "train"]
    evals = [r for r in records if r.get("kind") == "eval" and "loss" in r]
    speeds = [r["tokens_per_sec"] for r in train if r.get("tokens_per_sec")]
    rows = count_parameters(model)
    in_totals = [row for row in rows if not row.component.startswith("MTP head")]
    context = int(config["data"]["seq_len"])
    return PointRow(
        name=workdir.name, steps=max((int(r["step"]) for r in train), default=0),
        eval_loss=float(evals[-1]["loss"]) if evals else None,
        tokens_per_sec=float(statistics.median(speeds)) if speeds else None,
        params=sum(row.total for row in in_totals),
        active_params=sum(row.active for row in in_totals),
        kv_values_per_token=kv_values_per_token(model, context), context=context)


def collect(sweep_dir: str | pathlib.Path) -> list[PointRow]:
    """The rows of every trained point under `sweep_dir`: in the sweep's order when its
    sweep.json is there, else by name. Raises FileNotFoundError when there is none."""
    sweep_dir = pathlib.Path(sweep_dir)
    trained = {p.name for p in sweep_dir.iterdir() if (p / CONFIG_FILE).is_file()} \
        if sweep_dir.is_dir() else set()
    order = sorted(trained)
    if (sweep_dir / SWEEP_FILE).is_file():
        listed = json.loads((sweep_dir / SWEEP_FILE).read_text())["points"]
        order = [n for n in listed if n in trained] + [n for n in order if n not in listed]
    if not order:
        raise FileNotFoundError(f"no trained sweep points in {sweep_dir} (a point is a "
                                f"directory with {CONFIG_FILE}, as `--sweep` writes)")
    return [point_row(sweep_dir / name) for name in order]


def _number(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def markdown(rows: list[PointRow]) -> str:
    """The table; the eval-loss difference is against the first row (the sweep's baseline)."""
    base = rows[0].eval_loss
    lines = ["| point | steps | eval loss | vs first | tokens/s | params | active params "
             f"| KV values/token @ {rows[0].context} |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        delta = (row.eval_loss - base) if row.eval_loss is not None and base is not None else None
        lines.append(
            f"| {row.name} | {row.steps} | {_number(row.eval_loss, '.4f')} "
            f"| {_number(delta, '+.4f')} | {_number(row.tokens_per_sec, ',.0f')} "
            f"| {row.params:,} | {row.active_params:,} | {row.kv_values_per_token:,.0f} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[PointRow], out: str | pathlib.Path) -> pathlib.Path:
    """Four bar charts, one per compared quantity, the points on each x axis."""
    out = pathlib.Path(out)
    fig = Figure(figsize=(16, 4.5), layout="constrained")
    names = [row.name for row in rows]
    panels = (("final eval loss", [row.eval_loss or 0.0 for row in rows]),
              ("tokens/s (training)", [row.tokens_per_sec or 0.0 for row in rows]),
              ("active parameters", [row.active_params for row in rows]),
              (f"KV values/token @ {rows[0].context}", [row.kv_values_per_token for row in rows]))
    for ax, (title, values) in zip(fig.subplots(1, len(panels)), panels):
        ax.bar(range(len(rows)), values, color="tab:blue")
        ax.set_xticks(range(len(rows)), names, rotation=35, ha="right", fontsize=8)
        ax.set_title(title)
        ax.grid(axis="y", alpha=0.3)
        if title == "final eval loss" and any(values):
            low = min(v for v in values if v)
            ax.set_ylim(low * 0.98, max(values) * 1.01)  # the differences, not the offset
    fig.savefig(out, dpi=110)
    return out


def write_table(sweep_dir: str | pathlib.Path) -> tuple[str, pathlib.Path]:
    """Collects the sweep, writes `ablation.md` and `ablation.png` into it; returns the table
    text and the plot's path."""
    sweep_dir = pathlib.Path(sweep_dir)
    rows = collect(sweep_dir)
    text = markdown(rows)
    (sweep_dir / TABLE_FILE).write_text(text)
    return text, plot(rows, sweep_dir / PLOT_FILE)
