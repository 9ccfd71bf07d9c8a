"""The long-context evaluation's outputs: a printed table, a JSON file and a heat map PNG.

The heat map is drawn through matplotlib's object API (`Figure`), as `mimo_jax.train.curves`
does, so importing this module never picks a backend.
"""

from __future__ import annotations

import json
import pathlib

import numpy as np
from matplotlib.figure import Figure

RESULTS_FILE = "long_context.json"
HEATMAP_FILE = "long_context.png"


def _percent(value: float) -> str:
    return f"{100 * value:.0f}%"


def format_table(results: dict) -> str:
    """Accuracy by length (rows) and depth (columns) for each task with the answer ids' mean loss
    (nats), then perplexity by position bucket for each length, as aligned text."""
    depths = [str(d) for d in results["depths"]]
    lines = []
    for task, by_length in results["accuracy"].items():
        lines.append(f"{task}: exact-match accuracy by length x depth "
                     f"({results['samples']} samples a cell)")
        lines.append("  length " + "".join(f"{'depth ' + d:>12}" for d in depths) + f"{'mean':>8}"
                     + f"{'answer loss':>14}")
        for length, cells in by_length.items():
            values = [cells[d] for d in depths]
            loss = results["answer_loss"][task][length]
            lines.append(f"  {length:>6} " + "".join(f"{_percent(v):>12}" for v in values)
                         + f"{_percent(float(np.mean(values))):>8}{loss:>14.2f}")
    lines.append("held-out perplexity by position bucket")
    for length, entry in results["perplexity"].items():
        edges = entry["edges"]
        spans = [f"{low}-{high}" for low, high in zip(edges[:-1], edges[1:])]
        if entry["perplexity"] is None:
            lines.append(f"  {length:>6}  no held-out document is {length} tokens long")
            continue
        cells = "  ".join(f"[{s}] {p:.2f}" for s, p in zip(spans, entry["perplexity"]))
        lines.append(f"  {length:>6}  {cells}  ({entry['rows']} rows)")
    return "\n".join(lines)


def write_json(results: dict, out: str | pathlib.Path) -> pathlib.Path:
    """Writes `results` as `<out>/long_context.json` and returns its path."""
    path = pathlib.Path(out) / RESULTS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2))
    return path


def plot_heatmap(results: dict, out: str | pathlib.Path) -> pathlib.Path:
    """Draws one accuracy heat map per task (length rows x depth columns) into
    `<out>/long_context.png` and returns its path."""
    tasks = list(results["accuracy"])
    depths = [str(d) for d in results["depths"]]
    fig = Figure(figsize=(4.5 * len(tasks), 0.6 * len(results["lengths"]) + 2),
                 layout="constrained")
    for i, task in enumerate(tasks):
        ax = fig.add_subplot(1, len(tasks), i + 1)
        lengths = list(results["accuracy"][task])
        grid = np.asarray([[results["accuracy"][task][n][d] for d in depths] for n in lengths])
        image = ax.imshow(grid, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
        for (r, c), value in np.ndenumerate(grid):
            ax.text(c, r, _percent(value), ha="center", va="center",
                    color="white" if value < 0.6 else "black")
        ax.set_xticks(range(len(depths)), depths)
        ax.set_yticks(range(len(lengths)), lengths)
        ax.set_xlabel("depth")
        if i == 0:  # the rows are the same lengths in every panel
            ax.set_ylabel("length (tokens)")
        ax.set_title(task)
    fig.colorbar(image, ax=fig.axes, label="exact-match accuracy")
    path = pathlib.Path(out) / HEATMAP_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path
