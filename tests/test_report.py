"""--report-to tensorboard | wandb: the libraries' own files, read back, hold the rows of metrics.jsonl and the run config."""

import json
import struct

import pytest

from qlora_ga.cli import main
from qlora_ga.metrics import TensorBoardReporter, read_metrics


def args(model_dir, out, *extra):
    return ["--model", str(model_dir), "--output-dir", str(out), "--n-builtin", "24", "--max-length", "96",
            "--batch-size", "4", "--grad-accum", "1", "--init", "gaussian", "--max-steps", "4", "--eval-split", "0.2",
            "--eval-every", "2", "--sample-prompts", "0", "--no-gradient-checkpointing", *extra]


def _series(rows) -> dict[str, list[tuple[int, float]]]:
    out: dict[str, list[tuple[int, float]]] = {}
    for r in rows:
        for k, v in r.items():
            if k != "step" and isinstance(v, (int, float)):
                out.setdefault(k, []).append((r["step"], float(v)))
    return out


def _events(log_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


def test_tensorboard_event_file_holds_the_metrics_and_config(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    assert main(args(tiny_model_dir, out, "--report-to", "tensorboard")) == 0
    want = _series(read_metrics(out / "metrics.jsonl"))
    assert {"loss", "lr", "grad_norm", "tokens_per_s", "eval_loss"} <= set(want)
    assert [s for s, _ in want["loss"]] == [1, 2, 3, 4] and [s for s, _ in want["eval_loss"]] == [0, 2, 4]
    acc = _events(out / "tensorboard")
    assert set(acc.Tags()["scalars"]) == set(want)
    for tag, points in want.items():
        got = [(e.step, e.value) for e in acc.Scalars(tag)]
        assert [s for s, _ in got] == [s for s, _ in points], tag
        assert all(v == pytest.approx(w, rel=1e-6, abs=1e-30) for (_, v), (_, w) in zip(got, points)), tag
    (config,) = acc.Tensors("run_config/text_summary")
    text = config.tensor_proto.string_val[0].decode()
    assert "report_to: tensorboard" in text and "init: gaussian" in text and "max_steps: 4" in text


def test_tensorboard_resume_drops_the_steps_after_the_checkpoint(tmp_path):
    first = TensorBoardReporter(tmp_path, {"lr": 1e-3})
    for step in range(1, 5):
        first.log({"step": step, "loss": float(step)})
    first.close()
    resumed = TensorBoardReporter(tmp_path, {"lr": 1e-3}, resume_step=2)
    for step in (3, 4):
        resumed.log({"step": step, "loss": 10.0 * step, "note": "text is not a scalar", "bad": float("nan")})
    resumed.close()
    acc = _events(tmp_path)
    assert set(acc.Tags()["scalars"]) == {"loss"}
    assert [(e.step, e.value) for e in acc.Scalars("loss")] == [(1, 1.0), (2, 2.0), (3, 30.0), (4, 40.0)]


def _wandb_records(path):
    """The records of a W&B ``.wandb`` file (LevelDB log framing: 32 KiB blocks, 7-byte chunk headers)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, chunks, buf = 7, [], b""
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        if left < 7:
            pos += left
            continue
        _, n, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk, pos = data[pos + 7:pos + 7 + n], pos + 7 + n
        if kind == 1:
            chunks.append(chunk)
        elif kind == 2:
            buf = chunk
        elif kind == 3:
            buf += chunk
        elif kind == 4:
            chunks.append(buf + chunk)
        else:
            break  # zero padding at the end
    records = []
    for c in chunks:
        r = pb.Record()
        r.ParseFromString(c)
        records.append(r)
    return records


def test_wandb_offline_writes_its_run_folder_with_the_metrics(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "run"
    assert main(args(tiny_model_dir, out, "--report-to", "wandb")) == 0
    (run_file,) = (out / "wandb").glob("offline-run-*/run-*.wandb")
    history, config = {}, {}
    for r in _wandb_records(run_file):
        kind = r.WhichOneof("record_type")
        if kind == "history":
            row = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
            history.setdefault(r.history.step.num, {}).update({k: v for k, v in row.items() if not k.startswith("_")})
        elif kind == "run":
            config.update({i.key: json.loads(i.value_json) for i in r.run.config.update})
    want = {r["step"]: {k: v for k, v in r.items() if k != "step"} for r in read_metrics(out / "metrics.jsonl")}
    assert sorted(history) == [0, 1, 2, 3, 4]
    for step, row in want.items():
        assert history[step] == pytest.approx(row, rel=1e-9), step
    assert config["report_to"] == "wandb" and config["init"] == "gaussian" and config["max_steps"] == 4


@pytest.mark.parametrize("package", ["tensorboard", "wandb"])
def test_missing_package_is_one_line_naming_pip(tiny_model_dir, tmp_path, monkeypatch, capsys, package):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == package else real(name, *a))
    out = tmp_path / "run"
    assert main(args(tiny_model_dir, out, "--report-to", package)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: --report-to {package} needs the '{package}' package: pip install {package}"]
    assert not out.exists()  # refused before loading anything


def test_unknown_report_to_is_one_line(tiny_model_dir, tmp_path, capsys):
    assert main(args(tiny_model_dir, tmp_path / "run", "--report-to", "mlflow")) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("error:") and "mlflow" in line and "tensorboard" in line
