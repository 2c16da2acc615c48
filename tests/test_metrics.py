"""Metrics JSONL logger (flushing, exact-resume truncation) and the loss-curve PNG."""

import json
import math

import pytest

from qlora_ga.metrics import MetricsLogger, plot_losses, read_metrics

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _log_steps(logger, steps):
    for s in steps:
        logger.log(step=s, loss=2.0 / s, lr=1e-4, grad_norm=0.5, tokens_per_s=1000.0, mem=1.5)
        if s % 5 == 0:
            logger.log(step=s, eval_loss=2.5 / s)


def test_rows_are_flushed_and_read_back(tmp_path):
    path = tmp_path / "run" / "metrics.jsonl"
    logger = MetricsLogger(path)
    row = logger.log(step=1, loss=1.25, lr=2e-4, note="x")
    assert row == {"step": 1, "loss": 1.25, "lr": 2e-4, "note": "x"}
    # readable before close: each line is flushed as it is written
    assert read_metrics(path) == [row]
    assert path.read_text().count("\n") == 1
    logger.log_row({"step": 2, "loss": float("nan")})  # non-finite -> null, file stays valid JSON
    logger.close()
    rows = read_metrics(path)
    assert rows[1] == {"step": 2, "loss": None}
    assert all(json.loads(line) for line in path.read_text().splitlines())
    with pytest.raises(RuntimeError):
        logger.log(step=3)


def test_scalar_like_values_are_plain_numbers(tmp_path):
    torch = pytest.importorskip("torch")
    path = tmp_path / "m.jsonl"
    with MetricsLogger(path) as logger:
        logger.log(step=torch.tensor(3), loss=torch.tensor(0.5), mem={"gpu": torch.tensor(1.0)})
    assert read_metrics(path) == [{"step": 3, "loss": 0.5, "mem": {"gpu": 1.0}}]


def test_default_appends_and_overwrite_starts_fresh(tmp_path):
    path = tmp_path / "m.jsonl"
    with MetricsLogger(path) as logger:
        _log_steps(logger, range(1, 4))
    with MetricsLogger(path) as logger:
        assert logger.rows_kept == 3
        logger.log(step=4, loss=0.1)
    assert [r["step"] for r in read_metrics(path)] == [1, 2, 3, 4]
    with MetricsLogger(path, overwrite=True) as logger:
        assert logger.rows_kept == 0
        logger.log(step=1, loss=0.9)
    assert read_metrics(path) == [{"step": 1, "loss": 0.9}]
    assert read_metrics(tmp_path / "missing.jsonl") == []


def test_resume_truncates_rows_after_step(tmp_path):
    path = tmp_path / "m.jsonl"
    with MetricsLogger(path) as logger:
        logger.log(event="start")  # rows without a step are kept
        _log_steps(logger, range(1, 13))
    # crash mid-write: a torn last line
    with open(path, "a") as f:
        f.write('{"step": 13, "lo')
    assert len(read_metrics(path)) == 1 + 12 + 2  # torn line skipped by the reader

    with MetricsLogger(path, resume_step=7) as logger:
        assert logger.rows_kept == 1 + 7 + 1  # steps 1..7 plus the eval row at step 5
        _log_steps(logger, range(8, 13))

    # identical to an uninterrupted run
    reference = tmp_path / "ref.jsonl"
    with MetricsLogger(reference) as logger:
        logger.log(event="start")
        _log_steps(logger, range(1, 13))
    assert read_metrics(path) == read_metrics(reference)
    assert path.read_text() == reference.read_text()

    with MetricsLogger(path, resume_step=0) as logger:
        assert logger.rows_kept == 1
    assert read_metrics(path) == [{"event": "start"}]


def test_append_after_torn_line_does_not_glue_rows(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "lo')
    with MetricsLogger(path) as logger:
        logger.log(step=2, loss=0.5)
    assert read_metrics(path) == [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 0.5}]


def test_plot_losses_writes_png(tmp_path):
    path = tmp_path / "m.jsonl"
    with MetricsLogger(path) as logger:
        _log_steps(logger, range(1, 21))
        logger.log(step=21, loss=float("inf"))  # skipped in the plot
    png = tmp_path / "plots" / "loss.png"
    out = plot_losses(path, png)
    assert out == png
    data = png.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 1000
    assert not [p for p in png.parent.iterdir() if p.name != "loss.png"]  # no temp file left behind
    # overwriting an existing plot, and plotting a file with no losses yet, both work
    plot_losses(path, png)
    assert png.read_bytes()[:8] == PNG_MAGIC
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    plot_losses(empty, tmp_path / "empty.png")
    assert (tmp_path / "empty.png").read_bytes()[:8] == PNG_MAGIC
    assert math.isclose(read_metrics(path)[0]["loss"], 2.0)
