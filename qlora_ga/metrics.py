"""Training metrics as JSON lines, and the loss-curve plot.

One line per logged step, fields chosen by the caller (``step``, ``loss``, ``lr``, ``grad_norm``,
``tokens_per_s``, ``mem``...; evaluation rows carry ``eval_loss``). Each line is flushed as it is
written, so the file is readable while training runs and survives a crash up to the last line.

Exact resume: ``MetricsLogger(path, resume_step=k)`` keeps the rows with ``step <= k`` (and rows
without a step), drops the rest and a torn last line, and appends after them, so the metrics of a
resumed run are the same as those of a run that was never interrupted.

Reporting (``--report-to``): ``make_reporter("tensorboard" | "wandb", out_dir, run_config)`` gives a
reporter that :class:`MetricsLogger` hands every row it writes, so TensorBoard / Weights & Biases get
the same scalars as ``metrics.jsonl`` (every numeric field but ``step``, under its own name, at its
``step``) plus the run config, through the libraries' own writers: ``torch.utils.tensorboard``'s
``SummaryWriter`` (event files in ``OUTPUT_DIR/tensorboard``; on resume, events after the resumed
step are purged like the JSONL rows) and ``wandb`` (run folder in ``OUTPUT_DIR/wandb``;
``WANDB_MODE=offline`` logs without an account; a resumed run is a new W&B run). A missing package is a one-line error naming the
pip command.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from .errors import QloraGaError
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


class MetricsLogger:
    """Append-only JSONL metrics file.

    - ``MetricsLogger(path)`` appends to the file (created if missing);
    - ``MetricsLogger(path, resume_step=k)`` first drops the rows with ``step > k`` (exact resume);
    - ``MetricsLogger(path, overwrite=True)`` starts an empty file (a fresh run in a reused folder).

    Use as a context manager or call :meth:`close`. ``rows_kept`` is the number of rows found.
    """

    def __init__(self, path: str | os.PathLike, resume_step: int | None = None, overwrite: bool = False,
                 reporter=None):
        self.reporter = reporter  # also gets every row written (see make_reporter); closed by its owner
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
            atomic_write(self.path, "".join(json.dumps(r) + "\n" for r in kept))
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
        if self.reporter is not None:
            self.reporter.log(row)
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


# ----------------------------------------------------------------------------- --report-to

PIP_NAMES = {"tensorboard": "tensorboard", "wandb": "wandb"}


def check_report_to(report_to: str | None) -> None:
    """Raise a one-line error when the package ``report_to`` needs is not installed (before anything runs)."""
    import importlib.util

    if report_to in (None, "none"):
        return
    if report_to not in PIP_NAMES:
        raise QloraGaError(f"unknown --report-to '{report_to}': use none, tensorboard or wandb")
    if importlib.util.find_spec(report_to) is None:
        raise QloraGaError(f"--report-to {report_to} needs the '{PIP_NAMES[report_to]}' package: pip install {PIP_NAMES[report_to]}")


def _scalars(row: dict) -> tuple[int | None, dict[str, float]]:
    step = row.get("step")
    values = {k: v for k, v in row.items()
              if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}
    return (int(step) if isinstance(step, (int, float)) else None), values


class TensorBoardReporter:
    """Rows as TensorBoard scalars (tag = the metrics.jsonl field name), the run config as a text summary."""

    def __init__(self, log_dir: str | os.PathLike, config: dict | None = None, resume_step: int | None = None):
        check_report_to("tensorboard")
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir = Path(log_dir)
        # purge_step: events at steps after the resumed one (written before an interruption) are dropped
        self.writer = SummaryWriter(str(self.log_dir), purge_step=None if resume_step is None else resume_step + 1)
        if config:
            import yaml

            text = yaml.safe_dump(_jsonable(config), sort_keys=False)
            self.writer.add_text("run_config", "".join("    " + line + "\n" for line in text.splitlines()), global_step=0)
            self.writer.flush()

    def log(self, row: dict) -> None:
        step, values = _scalars(row)
        for k, v in values.items():
            self.writer.add_scalar(k, v, global_step=step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbReporter:
    """Rows as a W&B run's history (same keys), the run config as its config; the run folder is ``out_dir/wandb``."""

    def __init__(self, out_dir: str | os.PathLike, config: dict | None = None, name: str | None = None):
        check_report_to("wandb")
        import wandb

        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        try:
            self.run = wandb.init(project=os.environ.get("WANDB_PROJECT") or "qlora-ga", dir=str(out_dir),
                                  name=name or out_dir.name, config=_jsonable(config or {}))
        except Exception as e:  # noqa: BLE001 - wandb raises its own errors (no login, no network)
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise QloraGaError(f"wandb could not start a run ({first}): run 'wandb login', or set WANDB_MODE=offline") from None

    def log(self, row: dict) -> None:
        step, values = _scalars(row)
        if values:
            self.run.log(values, step=step)

    def close(self) -> None:
        self.run.finish()


def make_reporter(report_to: str | None, out_dir: str | os.PathLike, config: dict | None = None,
                  resume_step: int | None = None):
    """A reporter for ``--report-to`` (None for ``none``): ``.log(row)`` and ``.close()``."""
    check_report_to(report_to)
    if report_to in (None, "none"):
        return None
    if report_to == "tensorboard":
        return TensorBoardReporter(Path(out_dir) / "tensorboard", config, resume_step)
    return WandbReporter(out_dir, config)


__all__ = ["MetricsLogger", "read_metrics", "plot_losses", "check_report_to", "make_reporter", "TensorBoardReporter",
           "WandbReporter"]
