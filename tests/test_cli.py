"""The fine-tuning command on the tiny model: training, resume, init-only, and every bad input (in this process;
the real script once, for a bad input's one line)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from qlora_ga.cli import main
from qlora_ga.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "finetune.py"


def base_args(model_dir, out, *extra):
    return ["--model", str(model_dir), "--output-dir", str(out), "--n-builtin", "48", "--max-length", "128",
            "--batch-size", "4", "--grad-accum", "2", "--init-samples", "8", "--sample-prompts", "0", *extra]


def run_cli(args, env=None):
    e = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", **(env or {}))
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=e, cwd=ROOT, timeout=600)


def assert_clean_error(res_or_code, stderr, pattern):
    import re

    lines = [ln for ln in stderr.strip().splitlines() if ln.startswith("error:")]
    assert res_or_code == 2, stderr
    assert len(lines) == 1 and re.search(pattern, lines[0]), stderr
    assert "Traceback" not in stderr


# ------------------------------------------------------------------ training through the command


def test_training_lowers_the_loss_and_writes_the_documented_layout(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    assert main(base_args(tiny_model_dir, out, "--max-steps", "10", "--lr", "3e-3", "--eval-split", "0.1", "--eval-every", "5")) == 0
    rows = read_metrics(out / "metrics.jsonl")
    assert rows[0] == {"step": 0, "eval_loss": rows[0]["eval_loss"]}  # the held-out loss at init
    rows = rows[1:]
    assert [r["step"] for r in rows] == list(range(1, 11))
    assert {"step", "loss", "lr", "grad_norm", "tokens_per_s", "mem"} <= set(rows[0])
    assert sum(r["loss"] for r in rows[-3:]) / 3 < sum(r["loss"] for r in rows[:3]) / 3
    assert [r["step"] for r in rows if "eval_loss" in r] == [5, 10]
    assert rows[-1]["eval_loss"] < read_metrics(out / "metrics.jsonl")[0]["eval_loss"]
    for name in ("adapter/adapter_config.json", "adapter/adapter_model.safetensors", "metrics.jsonl", "loss.png",
                 "run_config.yaml", "init_report.json", "checkpoints/step-10/trainer_state.json"):
        assert (out / name).is_file(), name
    report = json.loads((out / "init_report.json").read_text())
    assert report["n_sequences"] == 8 and len(report["modules"]) == 21
    assert report["peak_host_rss_bytes"] > 0 and report["peak_live_grad_bytes"] == report["max_block_grad_bytes"]
    assert all(len(m["top_singular_values"]) > 0 for m in report["modules"].values())


@pytest.mark.parametrize("extra", [("--lr", "2e-3"), ("--lr", "2e-3", "--group-by-length"),
                                   ("--optim", "prodigy", "--rank-allocation", "gradient")],
                         ids=["adamw", "grouped-by-length", "prodigy-gradient-ranks"])
def test_interrupted_run_resumes_exactly(tiny_model_dir, tmp_path, extra):
    common = ("--max-steps", "6", "--eval-split", "0.1", "--eval-every", "2", "--lora-dropout", "0.1", *extra)
    full, part = tmp_path / "full", tmp_path / "part"
    assert main(base_args(tiny_model_dir, full, *common)) == 0
    os.environ["QLORA_GA_STOP_AFTER"] = "3"
    try:
        assert main(base_args(tiny_model_dir, part, *common)) == 130  # stopped like a Ctrl-C after step 3
    finally:
        del os.environ["QLORA_GA_STOP_AFTER"]
    assert sorted(p.name for p in (part / "checkpoints").iterdir()) == ["step-3"]
    assert main(base_args(tiny_model_dir, part, *common, "--resume")) == 0
    code = main(base_args(tiny_model_dir, part, *common, "--resume", "--rank", "2"))
    assert code == 2  # a checkpoint of another rank is a clear error, and nothing is written
    keys = ("step", "loss", "lr", "grad_norm", "eval_loss", "d")
    a = [{k: r.get(k) for k in keys} for r in read_metrics(full / "metrics.jsonl")]
    b = [{k: r.get(k) for k in keys} for r in read_metrics(part / "metrics.jsonl")]
    assert a == b
    if "prodigy" in extra:
        # prodigy's step-size estimate is logged every step (and resumed: equal above); its lr is a multiplier, 1.0 at peak
        ds = [r["d"] for r in a if r["step"]]
        assert len(ds) == 6 and all(d >= 1e-6 for d in ds) and max(r["lr"] for r in a if r["step"]) == 1.0
        report = json.loads((full / "init_report.json").read_text())
        assert len(set(report["ranks"].values())) > 1
        assert report["trainable_parameters"]["gradient"] <= report["trainable_parameters"]["uniform"]
        adapter_cfg = json.loads((full / "adapter" / "adapter_config.json").read_text())
        assert adapter_cfg["rank_pattern"]  # the per-module ranks reach PEFT's own config


def test_max_steps_zero_writes_an_adapter_that_keeps_the_function(tiny_model_dir, tmp_path):
    from peft import PeftModel

    from qlora_ga.model import load_model

    out = tmp_path / "init-only"
    assert main(base_args(tiny_model_dir, out, "--max-steps", "0", "--export-merged")) == 0
    assert not (out / "metrics.jsonl").exists()
    merged_cfg = json.loads((out / "merged" / "config.json").read_text())
    assert "quantization_config" not in merged_cfg and merged_cfg["dtype"] == "float16"
    base, tok = load_model(tiny_model_dir)
    ids = torch.tensor([tok("Ava has 3 apples. How many apples does Ava have?").input_ids])
    with torch.no_grad():
        ref = base(input_ids=ids).logits
        pm = PeftModel.from_pretrained(base, out / "adapter")
        got = pm(input_ids=ids).logits
        assert pm.peft_config["default"].r == 16  # rank-2r: trainable (B, A) plus the frozen (-B0, A0)
    assert float((got - ref).abs().max()) <= 1e-5


# ------------------------------------------------------------------ bad input: exit 2, one line, nothing lost


def test_bad_input_through_the_script_exits_2_with_one_line_and_nothing_else(tiny_model_dir, tmp_path):
    """The real process, met once the libraries are loaded (an interrupted download): exit status 2 and one line on
    stderr, no library warnings, no traceback (export.py's: test_export.py)."""
    import shutil

    broken = tmp_path / "broken-model"
    shutil.copytree(tiny_model_dir, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    res = run_cli(base_args(broken, tmp_path / "o", "--max-steps", "1"))
    assert_clean_error(res.returncode, res.stderr, r"model\.safetensors' is damaged or incomplete.*download it again")
    assert len(res.stderr.strip().splitlines()) == 1, res.stderr  # nothing but the line (no library warnings)


def test_a_missing_model_folder_is_one_line(tmp_path, capsys):
    code = main(["--model", str(tmp_path / "missing-model"), "--output-dir", str(tmp_path / "o")])
    assert_clean_error(code, capsys.readouterr().err, r"does not exist")
    assert not (tmp_path / "o").exists()


def _write(path, text):
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize(
    "extra, pattern",
    [
        (["--rank", "0"], r"rank"),
        (["--rank", "-2"], r"rank"),
        (["--rank", "40"], r"too large .*lower --rank"),
        (["--init", "pissa"], r"init"),
        (["--optim", "sgd"], r"optim"),
        (["--format", "xml"], r"format"),
        (["--max-length", "4"], r"max.length"),
        (["--lr", "0"], r"lr"),
        (["--lr", "-1e-4"], r"lr"),
        (["--overlong", "drop", "--max-length", "8"], r"max.length"),
        (["--device", "cuda"], r"CUDA"),
        (["--liger"], r"--liger needs a CUDA GPU"),
        (["--unknown-flag", "1"], r"unknown|unrecognized"),
    ],
)
def test_bad_settings(tiny_model_dir, tmp_path, capsys, extra, pattern):
    code = main(base_args(tiny_model_dir, tmp_path / "o", *extra))
    assert_clean_error(code, capsys.readouterr().err, pattern)


@pytest.mark.parametrize(
    "content, suffix, pattern",
    [
        (None, ".jsonl", r"not (found|exist)|missing|does not exist"),
        ("", ".jsonl", r"empty|no (records|examples)"),
        ("{not json at all\n", ".jsonl", r"pars|read|JSON|json"),
        ('{"foo": "a", "bar": "b"}\n{"foo": "c", "bar": "d"}\n', ".jsonl", r"column"),
    ],
)
def test_bad_datasets(tiny_model_dir, tmp_path, capsys, content, suffix, pattern):
    path = tmp_path / f"data{suffix}"
    if content is not None:
        path.write_text(content)
    code = main(base_args(tiny_model_dir, tmp_path / "o", "--dataset", str(path)))
    assert_clean_error(code, capsys.readouterr().err, pattern)


def test_output_dir_with_another_run_is_refused_and_left_intact(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(base_args(tiny_model_dir, out, "--max-steps", "2")) == 0
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    capsys.readouterr()
    code = main(base_args(tiny_model_dir, out, "--max-steps", "2"))
    assert_clean_error(code, capsys.readouterr().err, r"already holds a run.*--resume.*--overwrite")
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    # a bad setting on an existing run changes nothing either
    code = main(base_args(tiny_model_dir, out, "--max-steps", "2", "--overwrite", "--rank", "40"))
    assert code == 2
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    code = main(base_args(tiny_model_dir, out, "--max-steps", "6", "--lr", "1e30", "--save-every", "1",
                          "--init", "gaussian", "--max-grad-norm", "0"))
    err = capsys.readouterr().err
    assert_clean_error(code, err, r"loss became (nan|inf).*last good checkpoint is .*step-\d.*lower --lr")
    steps = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert steps and all(not p.startswith(".tmp") for p in steps)
    last = out / "checkpoints" / steps[-1]
    assert last.name in err
    from safetensors.torch import load_file

    assert all(torch.isfinite(t).all() for t in load_file(last / "adapter_model.safetensors").values())


def test_out_of_memory_is_a_one_line_error(tiny_model_dir, tmp_path, capsys, monkeypatch):
    import qlora_ga.estimate.engine as engine

    def oom(*a, **k):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(engine, "gradient_pass", oom)
    code = main(base_args(tiny_model_dir, tmp_path / "o"))
    assert_clean_error(code, capsys.readouterr().err, r"out of GPU memory.*lower --batch-size")


def test_phi3_trains_with_its_fused_projections_through_the_cli(tmp_path, capsys):
    from qlora_ga.testing import make_tiny_model

    model_dir = make_tiny_model(tmp_path / "phi3", family="phi3", layers=2)
    code = main(base_args(model_dir, tmp_path / "o", "--max-steps", "1", "--rank", "4"))
    out = capsys.readouterr().out
    assert code == 0
    assert "adapters on 8 linears (o_proj, qkv_proj, gate_up_proj, down_proj)" in out
    cfg = json.loads((tmp_path / "o" / "adapter" / "adapter_config.json").read_text())
    assert set(cfg["target_modules"]) == {"o_proj", "qkv_proj", "gate_up_proj", "down_proj"}


def test_moe_run_says_what_gets_no_adapters(tmp_path, capsys):
    from qlora_ga.testing import make_tiny_model

    model_dir = make_tiny_model(tmp_path / "olmoe", family="olmoe", layers=2)
    cfg_path = model_dir / "config.json"
    cfg_path.write_text(cfg_path.read_text().replace('"output_router_logits": false', '"output_router_logits": true'))
    assert '"output_router_logits": true' in cfg_path.read_text()
    assert main(base_args(model_dir, tmp_path / "o", "--max-steps", "0", "--rank", "4")) == 0
    out = capsys.readouterr().out
    assert "adapters on 8 linears (q_proj, k_proj, v_proj, o_proj)" in out
    assert "note: OlmoeExperts keeps its expert weights fused in 3-D tensors" in out
    assert "router's auxiliary loss" in out
