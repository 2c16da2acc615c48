"""Training metrics as JSON lines, and the loss-curve plot.

One line per logged step, fields chosen by the caller (``step``, ``loss``, ``lr``, ``grad_norm``,
``tokens_per_s``, ``mem``...; evaluation rows carry ``eval_loss``). Each line is flushed as it is
written, so the file is readable while training runs and survives a crash up to the last line.

Exact resume: ``MetricsLogger(path, resume_step=k)`` keeps the rows with ``step <= k`` (and rows
without a step), drops the rest and a torn last line, and appends after them, so the metrics of a
resumed run are the same as those of a run that was never interrupted.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from .fileio import atomic_write


def _jsonable(value: Any) -> Any:
    """Plain JSON value: tensors / numpy scalars become numbers; NaN and inf become null."""
    if hasattr(value, "item") and callable(value.item) and getattr(value, "ndim", 0) == 0:
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def _parse_lines(text: str) -> list[dict]:
    """Rows of a JSONL text; a torn (unparsable) line, which only a crash mid-write leaves, is skipped."""
    rows = []
    for line in text.splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """All rows of a metrics JSONL file (an empty list if it does not exist)."""
    p = Path(path)
    if not p.is_file():
        return []
    return _parse_lines(p.read_text(encoding="utf-8"))


def _atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, text)


class MetricsLogger:
    """Append-only JSONL metrics file.

    - ``MetricsLogger(path)`` appends to the file (created if missing);
    - ``MetricsLogger(path, resume_step=k)`` first drops the rows with ``step > k`` (exact resume);
    - ``MetricsLogger(path, overwrite=True)`` starts an empty file (a fresh run in a reused folder).

    Use as a context manager or call :meth:`close`. ``rows_kept`` is the number of rows found.
    """

    def __init__(self, path: str | os.PathLike, resume_step: int | None = None, overwrite: bool = False):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if overwrite:
            kept: list[dict] = []
        else:
            kept = read_metrics(self.path)
            if resume_step is not None:
                kept = [r for r in kept if not isinstance(r.get("step"), (int, float)) or r["step"] <= resume_step]
        if overwrite or resume_step is not None or self._has_torn_tail():
            # rewrite atomically (drops rows after the resume step and any torn line), then append
            _atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        self.rows_kept = len(kept)
        self._f = open(self.path, "a", encoding="utf-8")

    def _has_torn_tail(self) -> bool:
        """Whether the file ends in a partial line (a crash mid-write), which appending would corrupt."""
        if not self.path.is_file() or self.path.stat().st_size == 0:
            return False
        with open(self.path, "rb") as f:
            f.seek(-1, os.SEEK_END)
            return f.read(1) != b"\n"

    def log(self, **fields: Any) -> dict:
        """Write one row (``step=..., loss=..., ...``) and flush it; return the row as written."""
        return self.log_row(fields)

    def log_row(self, row: dict) -> dict:
        if self._f is None:
            raise RuntimeError(f"metrics logger for {self.path} is closed")
        row = _jsonable(dict(row))
        self._f.write(json.dumps(row) + "\n")
        self._f.flush()
        return row

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None

    def __enter__(self) -> "MetricsLogger":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):  # pragma: no cover - best effort
        try:
            self.close()
        except Exception:
            pass


def plot_losses(metrics_path: str | os.PathLike, png_path: str | os.PathLike, title: str | None = None) -> Path:
    """Plot training ``loss`` and ``eval_loss`` against ``step`` from a metrics file into a PNG (atomically).

    Rows without a finite value are skipped; a file with no losses yet still gives a (labelled, empty) plot.
    """
    # the Agg canvas directly, not pyplot: no GUI backend, no global figure state, and the
    # backend chosen by the caller (e.g. a notebook) is left alone
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = read_metrics(metrics_path)

    def series(key: str) -> tuple[list[float], list[float]]:
        xs, ys = [], []
        for r in rows:
            x, y = r.get("step"), r.get(key)
            if isinstance(x, (int, float)) and isinstance(y, (int, float)) and not isinstance(y, bool) and math.isfinite(y):
                xs.append(x)
                ys.append(y)
        return xs, ys

    fig = Figure(figsize=(7, 4.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    tx, ty = series("loss")
    ex, ey = series("eval_loss")
    if tx:
        ax.plot(tx, ty, label="train loss", color="tab:blue", linewidth=1.2, alpha=0.9)
    if ex:
        ax.plot(ex, ey, label="eval loss", color="tab:orange", marker="o", markersize=4, linewidth=1.5)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (mean token cross-entropy)")
    ax.set_title(title or f"Loss curve: {Path(metrics_path).parent.name or Path(metrics_path).name}")
    ax.grid(True, alpha=0.3)
    if tx or ex:
        ax.legend()
    else:
        ax.text(0.5, 0.5, "no losses logged yet", ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout()

    png_path = Path(png_path)
    atomic_write(png_path, lambda f: fig.savefig(f, format="png"))
    return png_path


__all__ = ["MetricsLogger", "read_metrics", "plot_losses"]
