"""Nothing lost, nothing silently wrong: what --resume checks, damaged checkpoints, --overwrite, early errors.

One stopped run (tiny Llama, a JSONL dataset, 4 steps, stopped after step 3 with checkpoints at 1, 2, 3) is
copied by each test that changes it.
"""

import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch

from qlora_ga.cli import main
from qlora_ga.metrics import read_metrics

REPO = Path(__file__).resolve().parents[1]


def run_args(model_dir, out, dataset, *extra):
    return ["--model", str(model_dir), "--output-dir", str(out), "--dataset", str(dataset), "--max-length", "128",
            "--batch-size", "4", "--grad-accum", "1", "--init-samples", "8", "--sample-prompts", "0",
            "--max-steps", "4", "--save-every", "1", "--lr", "2e-3", "--warmup", "0", *extra]


def one_error_line(code, err, pattern):
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("error:")]
    assert code == 2, err
    assert len(lines) == 1 and re.search(pattern, lines[0]), err
    assert "Traceback" not in err
    return lines[0]


@pytest.fixture(scope="module")
def stopped(tiny_model_dir, tmp_path_factory):
    from qlora_ga.data import make_arithmetic_examples

    root = tmp_path_factory.mktemp("stopped")
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in make_arithmetic_examples(40, seed=0)))
    os.environ["QLORA_GA_STOP_AFTER"] = "3"
    try:
        assert main(run_args(tiny_model_dir, root / "run", data)) == 130
    finally:
        del os.environ["QLORA_GA_STOP_AFTER"]
    return root


def copy_run(stopped, tmp_path):
    """A copy of the stopped run (the dataset stays where it was: its path is one of the run's settings)."""
    shutil.copytree(stopped / "run", tmp_path / "run")
    return tmp_path / "run", stopped / "data.jsonl"


def test_resume_refuses_changed_settings_naming_each_key_and_value(stopped, tiny_model_dir, tmp_path, capsys):
    run, data = copy_run(stopped, tmp_path)
    before = (run / "metrics.jsonl").read_text()
    other_model = shutil.copytree(tiny_model_dir, tmp_path / "other-model")
    code = main(run_args(other_model, run, data, "--resume", "--batch-size", "2", "--init", "gaussian",
                         "--target-modules", "q_proj,v_proj"))
    line = one_error_line(code, capsys.readouterr().err, r"other settings")
    for part in (f"model '{Path(tiny_model_dir).resolve()}' -> '{other_model.resolve()}'", "batch_size 4 -> 2",
                 "init 'lora-ga' -> 'gaussian'", "target_modules 'all-linear' -> 'q_proj,v_proj'", "run_config.yaml --resume"):
        assert part in line, line
    # an earlier checkpoint of the same folder: a second timeline among the first one's checkpoints
    code = main(run_args(tiny_model_dir, run, data, "--resume", str(run / "checkpoints" / "step-1")))
    one_error_line(code, capsys.readouterr().err, r"checkpoints newer than step-1 \(step-2, step-3\).*mix two runs")
    code = main(run_args(tiny_model_dir, run, data, "--resume", "--overwrite"))
    one_error_line(code, capsys.readouterr().err, r"--resume .* --overwrite .*: pass one of them")
    # the same file name with other content: found from the tokenized data, after loading
    text = data.read_text()
    try:
        data.write_text(text.replace("apples", "pears"))
        code = main(run_args(tiny_model_dir, run, data, "--resume"))
    finally:
        data.write_text(text)
    one_error_line(code, capsys.readouterr().err, r"other settings \(the tokenized training data")
    assert (run / "metrics.jsonl").read_text() == before  # nothing written
    assert not (run / "resumes.jsonl").exists()


def test_damaged_checkpoints_are_skipped_with_a_line_and_the_resume_stays_exact(stopped, tiny_model_dir, tmp_path, capsys):
    run, data = copy_run(stopped, tmp_path)
    original = {r["step"]: r for r in read_metrics(run / "metrics.jsonl") if "loss" in r}
    ck = run / "checkpoints"
    (ck / "step-3" / "trainer_state.json").unlink()
    (ck / "step-2" / "resume_residual.safetensors").unlink()  # the residual lost: rank r alone is another model
    state = ck / "step-1" / "state.pt"
    # an explicitly named damaged checkpoint is an error, not a fall-back
    code = main(run_args(tiny_model_dir, run, data, "--resume", str(ck / "step-2")))
    one_error_line(code, capsys.readouterr().err, r"step-2 is damaged \(resume_residual.safetensors is missing\)")
    assert main(run_args(tiny_model_dir, run, data, "--resume")) == 0
    out = capsys.readouterr().out
    assert "checkpoint step-3 is damaged (" in out and "trainer_state.json is missing): trying step-2" in out
    assert "checkpoint step-2 is damaged (resume_residual.safetensors is missing): trying step-1" in out
    assert "resuming from" in out and out.split("resuming from")[1].split()[0].endswith("step-1")
    rows = {r["step"]: r for r in read_metrics(run / "metrics.jsonl") if "loss" in r}
    assert [rows[s]["loss"] for s in (2, 3)] == [original[s]["loss"] for s in (2, 3)]  # continued exactly
    # every checkpoint damaged: one line
    for p in ck.glob("step-*/state.pt"):
        p.write_bytes(p.read_bytes()[:100])
    code = main(run_args(tiny_model_dir, run, data, "--resume"))
    one_error_line(code, capsys.readouterr().err, r"every checkpoint in .* is damaged \(the newest: state.pt has 100 bytes")
    del state


def test_resume_applies_a_new_lr_and_length_records_them_and_keeps_the_run_config(stopped, tiny_model_dir, tmp_path, capsys):
    from peft import PeftModel
    from transformers.optimization import _get_cosine_schedule_with_warmup_lr_lambda as cosine

    from qlora_ga.export import export_adapter
    from qlora_ga.model import load_model

    run, data = copy_run(stopped, tmp_path)
    config_before = (run / "run_config.yaml").read_text()
    (run / "checkpoints" / ".step-9.tmp-abcd1234").mkdir()  # left by a killed checkpoint write
    (run / ".metrics.jsonl.abcd1234.tmp").write_text("{")
    # a plain --resume: the run's own settings (run_config.yaml), not the defaults of the options left out
    assert main(["--output-dir", str(run), "--resume"]) == 0  # to the planned end (step 4)
    assert not (run / "checkpoints" / ".step-9.tmp-abcd1234").exists() and not (run / ".metrics.jsonl.abcd1234.tmp").exists()
    # more steps at another lr: the schedule is rebuilt for both, not the old one run past its end
    assert main(run_args(tiny_model_dir, run, data, "--resume", "--lr", "1e-3", "--max-steps", "6",
                         "--save-total-limit", "2")) == 0
    assert "resume: lr 0.002 -> 0.001, total_steps 4 -> 6" in capsys.readouterr().out
    rows = {r["step"]: r for r in read_metrics(run / "metrics.jsonl") if "loss" in r}
    assert rows[4]["lr"] == pytest.approx(2e-3 * cosine(3, num_warmup_steps=0, num_training_steps=4, num_cycles=0.5), rel=1e-12)
    for step in (5, 6):
        expected = 1e-3 * cosine(step - 1, num_warmup_steps=0, num_training_steps=6, num_cycles=0.5)
        assert expected > 0 and abs(rows[step]["lr"] - expected) <= 1e-12, (step, rows[step]["lr"], expected)
    assert (run / "run_config.yaml").read_text() == config_before  # the run's own settings
    resumes = [json.loads(ln) for ln in (run / "resumes.jsonl").read_text().splitlines()]
    assert [r["step"] for r in resumes] == [3, 4]
    assert resumes[0]["changed"] == {} and resumes[1]["changed"] == {"lr": [0.002, 0.001], "total_steps": [4, 6]}
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-5", "step-6"]  # --save-total-limit 2
    # a checkpoint is a PEFT adapter folder: vanilla PEFT and the exporter load it, as the run's final model
    ckpt = run / "checkpoints" / "step-6"
    base, tok = load_model(tiny_model_dir)
    ids = torch.tensor([tok("Ava has 3 apples and buys 4 more.").input_ids])
    with torch.no_grad():
        pm = PeftModel.from_pretrained(base, ckpt, adapter_name="ckpt")
        got = pm(input_ids=ids).logits
        pm.load_adapter(str(run / "adapter"), adapter_name="final")
        pm.set_adapter("final")
        ref = pm(input_ids=ids).logits
    assert torch.equal(got, ref)
    assert (export_adapter(ckpt, tmp_path / "exported") / "adapter_config.json").is_file()
    from qlora_ga.export.cli import main as export_main

    before = (run / "adapter" / "adapter_model.safetensors").read_bytes()
    assert export_main(["--adapter", str(ckpt), "--out", str(run / "adapter"), "--overwrite"]) == 2
    assert "belongs to the training run" in capsys.readouterr().err
    assert (run / "adapter" / "adapter_model.safetensors").read_bytes() == before


def test_overwrite_keeps_the_old_run_until_the_new_one_has_saved(stopped, tiny_model_dir, tmp_path, capsys):
    run, data = copy_run(stopped, tmp_path)
    snapshot = {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()}

    # the new run fails at its first update (an lr so large that Adam's step overflows): the old run is back
    code = main(run_args(tiny_model_dir, run, data, "--overwrite", "--init", "gaussian", "--lr", "1e38", "--max-steps", "1"))
    one_error_line(code, capsys.readouterr().err, r"the update overflowed at step 1 \(lr 1e\+38\).*lower --lr")
    assert {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()} == snapshot  # all of it
    # killed while replacing, before the new run saved: the next start puts the old run back
    (run / ".previous-run").mkdir()
    for name in ("checkpoints", "metrics.jsonl", "run_config.yaml", "init_report.json"):
        os.replace(run / name, run / ".previous-run" / name)
    (run / ".previous-run" / ".complete").write_text("")
    (run / "metrics.jsonl").write_text("{}\n")  # the new run's first files
    (run / "run_config.yaml").write_text("init: gaussian\n")
    # ... and killed while setting it aside (run_config.yaml moved, the rest not yet): put back, nothing lost
    def start():
        assert main(run_args(tiny_model_dir, run, data, "--resume", "--max-steps", "3")) == 0
        assert "put back the run" in capsys.readouterr().out
        assert not (run / ".previous-run").exists()
        assert {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != "resumes.jsonl"
                and "adapter" != p.parent.name and p.name not in ("summary.json", "loss.png")} == snapshot

    start()
    (run / ".previous-run").mkdir()
    os.replace(run / "run_config.yaml", run / ".previous-run" / "run_config.yaml")
    start()
    # a new run that saves replaces the old one
    assert main(run_args(tiny_model_dir, run, data, "--overwrite", "--init", "gaussian", "--max-steps", "1")) == 0
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-1"]
    assert not (run / ".previous-run").exists() and not (run / "resumes.jsonl").exists()


def test_checkpoint_adapter_loading_is_strict(stopped, tiny_model_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    from qlora_ga.errors import QloraGaError
    from qlora_ga.init import init_adapters
    from qlora_ga.arch import resolve_targets
    from qlora_ga.model import load_model
    from qlora_ga.train import load_checkpoint_weights

    run, _ = copy_run(stopped, tmp_path)
    ckpt = run / "checkpoints" / "step-3"
    model, _ = load_model(tiny_model_dir)
    pm = init_adapters(model, None, method="kaiming", rank=8, alpha=16, target_modules=resolve_targets(model, ["q_proj", "v_proj"]))
    with pytest.raises(QloraGaError, match=r"does not fit the model: \d+ tensor\(s\) the model has no place for"):
        load_checkpoint_weights(pm, ckpt)  # the run adapted every linear; this model only q and v
    sd = load_file(ckpt / "resume_adapter.safetensors")
    save_file({k: v for k, v in sd.items() if "q_proj" not in k}, ckpt / "resume_adapter.safetensors")
    model, _ = load_model(tiny_model_dir)
    pm = init_adapters(model, None, method="kaiming", rank=8, alpha=16, target_modules=resolve_targets(model, "all-linear"))
    with pytest.raises(QloraGaError, match=r"adapter tensor\(s\) missing \(e.g. .*q_proj"):
        load_checkpoint_weights(pm, ckpt)


# ------------------------------------------------------------------ found before the model loads


@pytest.fixture
def no_model_load(monkeypatch):
    from qlora_ga import model

    def refuse(*a, **k):
        raise AssertionError("the model was loaded before the error was found")

    monkeypatch.setattr(model, "load_model", refuse)


def test_output_and_dataset_errors_come_before_the_model_loads(tiny_model_dir, tmp_path, capsys, no_model_load):
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"question": "1+1?", "answer": "2"}) + "\n")
    cases = [
        (["--output-dir", str(a_file / "run")], r"'.*a-file/run' is under '.*a-file', which is a file"),
        (["--output-dir", "/proc/qlora-ga-run"], r"'/proc/qlora-ga-run' cannot be written"),
        (["--dataset", str(tmp_path / "missing.jsonl")], r"not found: .*missing.jsonl"),
        (["--dataset", str(data), "--format", "prompt-response", "--prompt-column", "nope"], r"nope"),
    ]
    for extra, pattern in cases:
        code = main(["--model", str(tiny_model_dir), "--output-dir", str(tmp_path / "o"), *extra])
        one_error_line(code, capsys.readouterr().err, pattern)
    # a start cleans what killed writes of the run left, and nothing else that looks like it
    out = tmp_path / "o"
    out.mkdir()
    theirs = [".venv.old-2024abcd", ".notes.tmp-mine", ".data.jsonl.abcd1234.tmp", ".cfg.old-abcd1234"]
    for name in theirs:
        (out / name).mkdir()
    (out / ".metrics.jsonl.abcd1234.tmp").write_text("{")  # ours: a killed metrics write
    with pytest.raises(AssertionError, match="the model was loaded"):
        main(["--model", str(tiny_model_dir), "--output-dir", str(out), "--dataset", str(data)])
    assert sorted(p.name for p in out.iterdir()) == sorted(theirs)


@pytest.mark.parametrize("config", sorted(p.name for p in (REPO / "configs").glob("*.yaml")))
def test_every_shipped_config_reaches_the_model_or_fails_with_one_line(config, tmp_path, capsys, no_model_load):
    try:
        code = main(["--config", str(REPO / "configs" / config), "--output-dir", str(tmp_path / "o")])
    except AssertionError as e:  # every check before loading passed
        assert "the model was loaded" in str(e)
        return
    one_error_line(code, capsys.readouterr().err, r".")


def test_a_truncated_gguf_is_one_line(tmp_path, monkeypatch):
    from qlora_ga.errors import QloraGaError
    from qlora_ga.model import default_model_path, resolve_model_source

    monkeypatch.setenv("QLORA_GA_CACHE", str(tmp_path / "cache"))
    part = tmp_path / "model.gguf"
    with open(default_model_path(), "rb") as f:
        part.write_bytes(f.read(200_000))  # an interrupted download
    with pytest.raises(QloraGaError, match=r"cannot read the GGUF file .*model.gguf"):
        resolve_model_source(str(part))


def test_a_write_killed_midway_is_cleaned_up_by_the_next_write_of_the_same_folder(tmp_path):
    from qlora_ga.fileio import atomic_dir

    (tmp_path / ".merged.tmp-abcd1234").mkdir()  # a killed export's half-written folder
    (tmp_path / ".merged.old-abcd1234").mkdir()  # the previous export, moved aside just before the kill
    (tmp_path / ".merged.old-abcd1234" / "model.safetensors").write_text("previous")
    (tmp_path / ".other.tmp-abcd1234").mkdir()  # another target's: not this write's business
    with atomic_dir(tmp_path / "merged") as tmp:
        assert (tmp_path / "merged" / "model.safetensors").read_text() == "previous"  # put back first
        (tmp / "model.safetensors").write_text("new")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.tmp-abcd1234", "merged"]
    assert (tmp_path / "merged" / "model.safetensors").read_text() == "new"
