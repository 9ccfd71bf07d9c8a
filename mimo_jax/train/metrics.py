"""Where a run's numbers go: a JSONL log, TensorBoard event files, and the terminal.

`<workdir>/metrics.jsonl` holds one JSON object per line: {"step": N, "kind": "train", ...} or
{"step": N, "kind": "eval", ...}. A resumed run first drops the lines past its restored step
(they came from the interrupted run and are about to be recomputed), so the log of a resumed run
reads like the log of an uninterrupted one; TensorBoard is told the same with `purge_step`.
"""

from __future__ import annotations

import json
import math
import pathlib
import sys
import time
from typing import Any, TextIO

from tensorboardX import SummaryWriter
from tqdm import tqdm

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"


def read_metrics(workdir: str | pathlib.Path) -> list[dict[str, Any]]:
    """Every record of `<workdir>/metrics.jsonl` (a torn last line from a kill is skipped)."""
    path = pathlib.Path(workdir) / METRICS_FILE
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def _plain(value: Any) -> Any:
    value = value.item() if hasattr(value, "item") else value
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf; keep them readable
    return value


class MetricsWriter:
    """Appends records to the JSONL log and, when enabled, to TensorBoard."""

    def __init__(self, workdir: str | pathlib.Path, start_step: int, tensorboard: bool = True,
                 is_writer: bool = True):
        self.workdir = pathlib.Path(workdir)
        self.path = self.workdir / METRICS_FILE
        self._enabled = is_writer  # only process 0 writes in a multi-host run
        self._tb = None
        self._file: TextIO | None = None
        if not self._enabled:
            return
        kept = [r for r in read_metrics(self.workdir) if int(r.get("step", 0)) <= start_step]
        tmp = self.path.with_name(METRICS_FILE + ".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
        tmp.replace(self.path)
        self._file = open(self.path, "a", encoding="utf-8")
        if tensorboard:
            self._tb = SummaryWriter(str(self.workdir / TENSORBOARD_DIR),
                                     purge_step=start_step + 1 if start_step else None)

    def write(self, step: int, kind: str, values: dict[str, Any]) -> None:
        if not self._enabled:
            return
        record = {"step": int(step), "kind": kind, "time": round(time.time(), 3)}
        record.update({k: _plain(v) for k, v in values.items()})
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            for key, value in values.items():
                value = _plain(value)
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._tb.add_scalar(f"{kind}/{key}", value, step)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


class Progress:
    """A tqdm bar on a terminal, else one log line every `log_every` steps."""

    def __init__(self, mode: str, start_step: int, total_steps: int, log_every: int,
                 stream: TextIO = sys.stderr, enabled: bool = True):
        if mode == "auto":
            mode = "bar" if stream.isatty() else "log"
        self.mode = mode if enabled else "none"
        self._log_every = log_every
        self._total = total_steps
        self._bar = None
        if self.mode == "bar":
            self._bar = tqdm(total=total_steps, initial=start_step, file=stream,
                             dynamic_ncols=True, unit="step")

    def update(self, step: int, loss: float, cross_entropy: float,
               tokens_per_sec: float | None, extra: dict[str, float] | None = None) -> None:
        """Called after each step (`step` counts steps done) with the objective and its
        next-token cross-entropy, the number comparable with the eval loss; `extra` values
        (e.g. {"zero_grad_params": 12}) follow them on the line, by name."""
        speed = f"{tokens_per_sec:,.0f}" if tokens_per_sec else "-"
        text = f"loss {loss:.4f}  ce {cross_entropy:.4f}  tok/s {speed}"
        for name, value in (extra or {}).items():
            shown = f"{int(value):,}" if float(value).is_integer() else f"{value:.4g}"
            text += f"  {name} {shown}"
        if self._bar is not None:
            self._bar.update(1)
            self._bar.set_postfix_str(text, refresh=False)
        elif self.mode == "log" and (step % self._log_every == 0 or step == self._total):
            print(f"step {step}/{self._total}  {text}", flush=True)

    def message(self, text: str) -> None:
        """A line that does not break the bar."""
        if self._bar is not None:
            self._bar.write(text)
        elif self.mode != "none":
            print(text, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
