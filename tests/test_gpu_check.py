"""benchmarks/gpu_check.py, the one-command GPU check, in its CPU smoke mode (--tiny): the benchmark and the CLI
stages end to end, what lands in --out, and the verdicts it draws. The numbers are not judged (a CPU run is
no evidence); the CLI's checks are (bf16 / fp16 runs, the stopped-and-resumed run equal to the uninterrupted
one, the evaluations)."""

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"


def _load(path=SCRIPT):
    import importlib.util

    spec = importlib.util.spec_from_file_location(path.stem, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_gpu_check_tiny_cpu_end_to_end(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(SCRIPT), "--tiny", "--device", "cpu", "--only", "bench,layouts,cli,step,big",
                           "--out", str(out), "--workdir", str(work)], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-3000:]}"
    # flat, few files: small enough to come back from an offline GPU machine in one transfer
    files = sorted(p.name for p in out.iterdir())
    assert files == ["cli.jsonl", "layouts.jsonl", "logs.tar.gz", "memory-big.jsonl", "memory.jsonl", "step.jsonl",
                     "summary.json", "summary.md"]
    assert all(p.is_file() for p in out.iterdir())

    summary = json.loads((out / "summary.json").read_text())
    assert summary["finished"] is True and summary["tiny"] is True
    assert [s["stage"] for s in summary["stages"]] == ["bench", "layouts", "cli", "step", "big"]
    checks = summary["checks"]
    # bench: bench_memory's own target rows, taken over one for one with its verdicts
    mem = [json.loads(line) for line in (out / "memory.jsonl").read_text().splitlines()]
    targets = [r for r in mem if r["part"] == "target"]
    bench = [c for c in checks if c["stage"] == "bench"]
    assert len(targets) == 5 and len(bench) == 5
    for t, c in zip(targets, bench):
        assert c["check"] == f"{t['target']} [{t['shape']}]"
        assert c["verdict"] == ("PASS" if t["passed"] else "MISS") and c["value"] == t["value"]
    meta_keys = {"bench", "device", "torch_version", "bitsandbytes_version", "transformers_version", "peft_version",
                 "date", "command", "run_id", "model"}
    assert all(meta_keys <= set(r) for r in mem) and {r["bench"] for r in mem} == {"memory"}
    (init,) = [r for r in mem if r["part"] == "init"]
    assert init["shape"] == "2x32" and init["wall_s"] > 0 and init["peak_rss_gib"] > 0
    assert {"estimate_s", "fwdbwd_s", "init_over_fwdbwd", "state_device", "reserve_gib", "train_floor_gib"} <= set(init)
    (ref,) = [r for r in mem if r["part"] == "ref_init"]
    assert ref["oom"] is False and ref["wall_s"] > 0
    train = {(r["impl"], r["shape"]) for r in mem if r["part"] == "train"}
    assert {("qlora_ga", "1x32"), ("qlora_ga_no_residual", "1x32"), ("peft_qlora", "1x32"), ("peft_qlora", "2x32"),
            ("peft_qlora_no_prepare", "1x32")} <= train  # PEFT also at the init's micro-batch, for the memory target
    assert not any(impl == "qlora_ga_liger" for impl, _ in train)  # Liger: CUDA only
    assert all(r["tokens_per_s"] > 0 and {"step_s", "peak_rss_gib", "loss"} <= set(r) for r in mem if r["part"] == "train")
    assert all(isinstance(t["passed"], bool) for t in targets)
    assert sum("PEFT QLoRA" in t["target"] and "tokens/s" in t["target"] for t in targets) == 2  # both PEFT baselines
    cmd = mem[0]["command"]
    assert "--optim paged_adamw_32bit" in cmd and "--peft-prepare both" in cmd
    assert "--state-budget-gib" not in cmd  # the pass's own plan, as a user gets it
    assert init["plan"].startswith("gradient pass plan: every layer's inputs in host memory")

    # layouts: bench_step --data on the tiny model and generated data, one verdict per layout and shape
    (lay,) = [r for r in (json.loads(x) for x in (out / "layouts.jsonl").read_text().splitlines()) if r["part"] == "layout_summary"]
    assert lay["shape"] == "2x64" and set(lay["median_paired_over_padded"]) == {"padded", "padding_free", "padding_free_dense",
                                                                                 "packing", "peft_qlora_padded"}
    assert lay["flops_per_useful_token"]["padding_free"] > 0 and lay["median_peak_step_bytes"]["padded"] > 0
    layouts = [c for c in checks if c["stage"] == "layouts"]
    assert [c["check"] for c in layouts] == [f"{n} useful tokens/s >= 1.25x padded [2x64]" for n in ("padding_free", "packing")]
    assert all(c["value"] == lay["median_paired_over_padded"][n] for c, n in zip(layouts, ("padding_free", "packing")))

    # step: bench_step.py round-robin with --compile --fused (aot_eager in the smoke run): every implementation every round
    step = [json.loads(x) for x in (out / "step.jsonl").read_text().splitlines()]
    impls = ("qlora_ga", "qlora_ga_no_residual", "peft_qlora", "peft_qlora_no_prepare", "qlora_ga_compiled", "qlora_ga_fused",
             "qlora_ga_fused_compiled")
    assert sorted((r["impl"], r["round"]) for r in step if r["part"] == "step") == sorted((i, k) for i in impls for k in range(2))
    (ssum,) = [r for r in step if r["part"] == "summary"]
    assert set(ssum["median_tokens_per_s"]) == set(impls) and ssum["compile"]["backend"] == "aot_eager"
    assert ssum["compile"]["graph_breaks"] == 0 and ssum["compile"]["grad_rel_diff"] <= 1e-5  # aot_eager: eager's ops
    step_checks = {c["check"]: c for c in checks if c["stage"] == "step"}
    assert step_checks["--compile: graph breaks per run [1x32]"]["verdict"] == "PASS"
    assert step_checks["--compile equals eager (gradients, relative, <= 3e-2) [1x32]"]["verdict"] == "PASS"
    assert step_checks["--fused-lora equals eager (gradients, relative, <= 3e-2) [1x32]"]["value"] <= 1e-5  # fp32: rounding
    assert step_checks["fused_compiled / PEFT QLoRA (prepare) tokens/s [1x32]"]["value"] > 0  # (the targets are the 7B shapes')
    # the profiler's tables (a training step, the gradient pass; by time and by count) land in summary.md
    md = (out / "summary.md").read_text()
    assert md.count("by self time [1x32]") == 2 and md.count("by count [1x32]") == 2 and "aten::mm" in md

    # big: the 70B stage's code path on a 2-layer tiny Llama: built, the init and a training step, no cap on the CPU
    big = [json.loads(x) for x in (out / "memory-big.jsonl").read_text().splitlines()]
    assert next(r for r in big if r["part"] == "model")["n_layers"] == 2
    assert {c["check"] for c in checks if c["stage"] == "big"} >= {"gradient init 2x32 (CPU: no memory cap)",
                                                                    "training 1x32 (CPU: no memory cap)"}
    assert all(c["verdict"] == "PASS" for c in checks if c["stage"] == "big")

    # cli: every check passes, among them the resume check (exact on the CPU)
    cli = {c["check"]: c for c in checks if c["stage"] == "cli"}
    assert len(cli) == 7 and all(c["verdict"] == "PASS" for c in cli.values()), cli
    (resume,) = [c for name, c in cli.items() if name.startswith("resumed run's final loss")]
    assert resume["value"] == 0.0
    rows = [json.loads(line) for line in (out / "cli.jsonl").read_text().splitlines()]
    runs = {r["run"]: r for r in rows if r["part"] == "run"}
    assert set(runs) == {"bf16", "fp16", "bf16-stopped", "bf16-resumed"}
    assert runs["bf16-stopped"]["exit"] == 130 and runs["bf16-stopped"]["final_step"] == 2
    assert runs["bf16-resumed"]["steps_logged"] == [1, 2, 3, 4] == runs["bf16"]["steps_logged"]
    assert runs["fp16"]["final_loss"] != runs["bf16"]["final_loss"]  # the two compute dtypes really differ
    evals = {r["run"]: r for r in rows if r["part"] == "evaluate"}
    assert evals["evaluate-adapter"]["n"] == 4 and evals["evaluate-adapter"]["exact_match"] is not None
    assert evals["evaluate-merged"]["exact_match"] is None and evals["evaluate-merged"]["loss"] > 0
    assert all({"device", "torch_version", "date", "command", "model"} <= set(r) for r in rows)

    with tarfile.open(out / "logs.tar.gz") as tar:
        names = set(tar.getnames())
        assert {"logs/bench_memory.log", "logs/cli.log", "logs/cli-bf16.log", "logs/cli-bf16-resumed.log",
                "runs/bf16/metrics.jsonl", "runs/fp16/run_config.yaml", "eval-adapter.json"} <= names
        assert "compute_dtype: fp16" in tar.extractfile("runs/fp16/run_config.yaml").read().decode()
        assert "QLORA_GA_STOP_AFTER" in tar.extractfile("logs/cli-bf16-stopped.log").read().decode()
    md = (out / "summary.md").read_text()
    assert "== training step" in md and "| bf16-resumed | 0 | 4 |" in md
    assert f"{summary['tally']['PASS']} PASS" in proc.stdout and "0 FAIL" in proc.stdout


@pytest.mark.parametrize("extra, pattern", [
    (["--only", "bench,gpu"], "--only: unknown stage"),
    (["--steps", "4", "--save-every", "4"], "--save-every must be below --steps"),
    (["--test-data", "/nonexistent/test.jsonl"], "--test-data /nonexistent/test.jsonl: no such file"),
    (["--step-shapes", "4x"], "--step-shapes 4x: give shapes BxT"),
])
def test_bad_arguments_are_one_line_errors(tmp_path, capsys, extra, pattern):
    mod = _load()
    with pytest.raises(SystemExit) as e:
        mod.parse_args(["--tiny", "--device", "cpu", "--out", str(tmp_path / "out"), *extra])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and pattern in err[0]


def test_an_out_folder_holding_a_run_is_refused(tmp_path, capsys):
    mod = _load()
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "summary.json").write_text("{}")
    with pytest.raises(SystemExit) as e:
        mod.parse_args(["--tiny", "--device", "cpu", "--out", str(tmp_path / "out")])
    assert e.value.code == 2 and "already holds a gpu_check run" in capsys.readouterr().err
    assert (tmp_path / "out" / "summary.json").read_text() == "{}"


@pytest.mark.parametrize("limit_mib, parts", [(64, 2), (48, 3), (32, 5)])
def test_gpu_prepare_splits_the_gguf_so_every_transfer_stays_under_the_limit(limit_mib, parts):
    """benchmarks/gpu_prepare.py: the GGUF in ``--parts`` pieces, the first beside the wheels, the last beside the data,
    each transfer under ``--transfer-limit-mib`` and about the same size (the sizes of the 2026-11-26 preparation)."""
    mod = _load(ROOT / "benchmarks" / "gpu_prepare.py")
    mib = 2**20
    tree, wheels, gguf, small = int(3.0 * mib), int(22.3 * mib), int(93.4 * mib), int(0.7 * mib)
    room = int((limit_mib - mod.MARGIN_MIB) * mib) - tree
    sizes = mod.split_sizes(gguf, wheels, small, room, parts)
    assert len(sizes) == parts and sum(sizes) == gguf and min(sizes) >= 0
    loads = [wheels + sizes[0], *sizes[1:-1], sizes[-1] + small]
    assert max(loads) <= room and max(loads) - min(loads) <= mib
    if (limit_mib, parts) == (64, 2):  # docs/GPU.md: .gpu/a 35.9 MiB; 61.2 MiB per transfer
        assert round(sizes[0] / mib, 1) == 35.9 and round((tree + loads[0]) / mib, 1) == 61.2
    if parts > 2:  # the same files do not fit two transfers of that limit: refused
        assert mod.split_sizes(gguf, wheels, small, room, 2) is None
