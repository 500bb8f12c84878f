"""Run metrics: JSONL (`metrics.jsonl`, one object per step) + TensorBoard scalars, PNG curves, progress display."""
from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

METRICS_FILE = "metrics.jsonl"


class MetricsLogger:
    """`log(step, {name: value})` appends `{"step", "time", **values}` to run_dir/metrics.jsonl (non-finite
    values as null, so the file stays valid JSON) and writes the same scalars to TensorBoard in run_dir/tb."""

    def __init__(self, run_dir: str | Path, tensorboard: bool = True):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.run_dir / METRICS_FILE
        self._file = open(self.path, "a", encoding="utf-8")
        self._tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(self.run_dir / "tb"))

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if self._file is None:
            raise ValueError(f"MetricsLogger({self.run_dir}) is closed")
        if not isinstance(step, int) or isinstance(step, bool) or step < 0:
            raise ValueError(f"metrics step must be an int >= 0, got {step!r}")
        if not isinstance(metrics, dict):
            raise ValueError(f"metrics must be a dict of name -> number, got {type(metrics).__name__}")
        row = {"step": step, "time": round(time.time(), 3)}
        for name, value in metrics.items():
            if not isinstance(name, str) or not name or name in ("step", "time"):
                raise ValueError(f"metric name {name!r} must be a non-empty string other than step/time")
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                try:  # numpy / torch scalars
                    value = float(value)
                except (TypeError, ValueError):
                    raise ValueError(f"metric {name!r} at step {step} is not a number: {value!r:.80}") from None
            row[name] = float(value) if math.isfinite(value) else None
            if self._tb is not None:
                self._tb.add_scalar(name, float(value), step)
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()  # a crashed run keeps every logged step

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no {METRICS_FILE} in {run_dir}")
    from npr_async.data import read_jsonl

    return read_jsonl(path)


def plot_curves(run_dir: str | Path, out_png: str | Path | None = None) -> Path:
    """One panel per metric (value against step) from run_dir/metrics.jsonl; returns the PNG path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(run_dir)
    names = list(dict.fromkeys(k for r in rows for k in r if k not in ("step", "time")))
    if not names:
        raise ValueError(f"{Path(run_dir) / METRICS_FILE} has no metrics to plot")
    cols = min(3, len(names))
    nrows = -(-len(names) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4 * cols, 2.8 * nrows), squeeze=False)
    for ax, name in zip(axes.flat, names):
        pts = [(r["step"], r[name]) for r in rows if r.get(name) is not None]
        ax.plot([s for s, _ in pts], [v for _, v in pts], marker="." if len(pts) < 50 else None)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    fig.tight_layout()
    out = Path(out_png) if out_png else Path(run_dir) / "curves.png"
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


class Progress:
    """Progress of `total` steps: a rich live bar on a terminal, one plain line per update otherwise.

    mode: "auto" (rich when `stream` is a TTY), "rich" or "plain" — LoggingConfig.progress."""

    def __init__(self, total: int, description: str = "", mode: str = "auto", stream=None):
        if mode not in ("auto", "rich", "plain"):
            raise ValueError(f"progress mode must be auto, rich or plain, got {mode!r}")
        if not isinstance(total, int) or isinstance(total, bool) or total < 0:
            raise ValueError(f"progress total must be an int >= 0, got {total!r}")
        self.stream = stream if stream is not None else sys.stderr
        self.total, self.description, self.done = total, description, 0
        self.start = time.monotonic()
        tty = getattr(self.stream, "isatty", lambda: False)()
        self.mode = ("rich" if tty else "plain") if mode == "auto" else mode
        self._rich = None
        if self.mode == "rich":
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
            from rich.progress import Progress as RichProgress

            console = Console(file=self.stream, force_terminal=True)
            self._rich = RichProgress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                      TimeElapsedColumn(), TextColumn("{task.fields[info]}"), console=console)
            self._task = self._rich.add_task(description, total=total, info="")
            self._rich.start()

    @staticmethod
    def _fmt(fields: dict) -> str:
        return " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in fields.items())

    def update(self, advance: int = 1, **fields) -> None:
        """Advance by `advance` steps and show `fields` (e.g. loss=0.1, reward=0.5)."""
        self.done += advance
        info = self._fmt(fields)
        if self._rich is not None:
            self._rich.update(self._task, advance=advance, info=info)
        else:
            elapsed = time.monotonic() - self.start
            head = f"{self.description} " if self.description else ""
            self.stream.write(f"{head}{self.done}/{self.total} {info} ({elapsed:.1f}s)".replace("  ", " ") + "\n")
            self.stream.flush()

    def close(self) -> None:
        if self._rich is not None:
            self._rich.stop()
            self._rich = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
