"""Smoke tests of the benchmark scripts (tiny settings, CPU; bench_convergence in a subprocess, the others in this
process): they run end to end and write
JSONL rows with the expected keys. The numbers themselves are not checked (a CPU run is no evidence).
bench_memory.py and bench_step.py run in tests/test_gpu_check.py's end-to-end test (its bench, layouts, step and
big stages), which checks their rows."""

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from qlora_ga.testing import assert_close_rel

ROOT = Path(__file__).resolve().parents[1]
META_KEYS = {"bench", "device", "torch_version", "bitsandbytes_version", "transformers_version", "peft_version",
             "date", "command", "run_id", "model"}


def _run(args, tmp_path, timeout=300):
    # one intra-op thread: on a busy small CPU, OpenMP's spinning threads can slow a run down a hundredfold
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"
    return proc


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _write_gsm8k(folder: Path):
    folder.mkdir(parents=True)
    rng = random.Random(0)
    for name, n in (("train", 16), ("test", 6)):
        with open(folder / f"{name}.jsonl", "w") as f:
            for _ in range(n):
                a, b = rng.randint(1, 40), rng.randint(1, 40)
                f.write(json.dumps({"question": f"Ava has {a} coins and finds {b} more. How many coins does she have?",
                                    "answer": f"She has {a} + {b} = <<{a}+{b}={a + b}>>{a + b} coins.\n#### {a + b}"}) + "\n")


def test_bench_convergence_quick(tmp_path, tiny_model_dir, capsys):
    data = tmp_path / "gsm8k"
    _write_gsm8k(data)
    out, png = tmp_path / "bench" / "convergence.jsonl", tmp_path / "bench" / "convergence.png"
    proc = _run([str(ROOT / "benchmarks" / "bench_convergence.py"), "--quick", "--model", str(tiny_model_dir),
                 "--data-dir", str(data), "--methods", "gaussian,lora-ga", "--steps", "2", "--gamma", "8", "--out", str(out),
                 "--plot", str(png), "--workdir", str(tmp_path / "work")], tmp_path)
    rows = _rows(out)
    steps, runs = [r for r in rows if r["kind"] == "step"], [r for r in rows if r["kind"] == "run"]
    # the metadata once per run, on its run row; a step row names its run by run_id only
    assert runs and all(META_KEYS <= set(r) for r in runs)
    assert all(set(r) & META_KEYS == {"bench", "run_id"} for r in steps)
    assert {r["run_id"] for r in steps} == {r["run_id"] for r in runs}
    # exactly one row per (method, step): step 0 (before training) once, with no training loss
    assert sorted((r["method"], r["step"]) for r in steps) == [(m, s) for m in ("gaussian", "lora-ga") for s in (0, 1, 2)]
    for r in steps:
        assert {"method", "lr", "seed", "step", "loss", "eval_loss"} <= set(r)
        if r["step"] > 0:
            assert r["loss"] > 0 and {"grad_norm", "tokens_per_s", "lr_now"} <= set(r)
    # held-out loss at step 0 and at the end; LoRA-GA's residual keeps the function at init
    s0 = {r["method"]: r["eval_loss"] for r in steps if r["step"] == 0}
    assert_close_rel(s0["lora-ga"], s0["gaussian"], 1e-5, "held-out loss at step 0")  # measured 0
    assert all(r["eval_loss"] is not None for r in steps if r["step"] == 2)
    assert len(runs) == 2 and all(r["error"] is None and r["final_eval_loss"] > 0 for r in runs)
    assert png.is_file() and png.stat().st_size > 1000
    # each run trained in its own folder under --workdir, removed once its rows were read (no --keep-runs)
    assert (tmp_path / "work").is_dir() and not any((tmp_path / "work").iterdir())
    # the pooled report reads the same file: one row per (method, lr), the run's own final held-out loss
    pooled_png = tmp_path / "pooled.png"
    capsys.readouterr()
    assert _load_report().main([str(out), "--plot", str(pooled_png), "--plot-best-only"]) == 0
    assert pooled_png.is_file() and pooled_png.stat().st_size > 1000
    table = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| gaussian") or line.startswith("| lora-ga")]
    assert len(table) == 2
    assert all(r["gamma_override"] == 8.0 for r in runs)  # --gamma: lora-ga's scale; vanilla LoRA has none
    for r in runs:
        name = r["method"] + (" (gamma 8)" if r["method"] == "lora-ga" else "")
        line = next(line for line in table if line.startswith(f"| {name} |"))
        assert f"{r['final_eval_loss']:.3f}" in line.split("|")[8]
    # the benchmark prints that same table for its own runs (one summary, not a second implementation)
    assert all(line in proc.stdout.splitlines() for line in table)


def _load_report():
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_report", ROOT / "benchmarks" / "bench_report.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _synthetic_runs(path: Path, runs: list[tuple], found: tuple = (), **extra):
    """runs: (run_id, method, lr, seed, train losses, {step: eval}); 4 steps per run, with the metadata on every
    step row as bench_convergence wrote it before step rows carried only ``run_id`` (the committed files have both);
    ``found``: the lr each ``lr="auto"`` run chose, in order."""
    extra_found = list(found)
    meta = dict(bench="convergence", total_steps=4, batch_size=2, grad_accum=1, max_length=64, eval_examples=3, rank=8,
                optim="adamw", init_samples=16)
    meta.update(extra)
    with open(path, "w") as f:
        for run_id, method, lr, seed, losses, evals in runs:
            base = dict(meta, run_id=run_id, method=method, init=method, lr=lr, seed=seed)
            f.write(json.dumps(dict(base, kind="step", step=0, loss=None, eval_loss=evals[0])) + "\n")
            for i, loss in enumerate(losses, 1):
                f.write(json.dumps(dict(base, kind="step", step=i, loss=loss, eval_loss=evals.get(i))) + "\n")
            found = {"lr_found": extra_found.pop(0)} if lr == "auto" else {}
            f.write(json.dumps(dict(base, kind="run", final_eval_loss=evals[4], error=None, **found)) + "\n")
        # an unfinished run (killed before its "run" row) must not count
        f.write(json.dumps(dict(meta, run_id="x", method="lora-ga", init="lora-ga", lr=1e-4, seed=2, kind="step", step=0,
                                loss=None, eval_loss=9.0)) + "\n")


def test_bench_report_pools_seeds_and_finds_steps_to_baseline(tmp_path, capsys):
    rep = _load_report()
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    _synthetic_runs(a, [("r1", "gaussian", 1e-3, 0, [2.0, 1.5, 1.2, 1.0], {0: 2.0, 2: 1.4, 4: 1.1}),
                        ("r1", "gaussian", 2e-3, 0, [2.0, 1.4, 1.1, 0.9], {0: 2.0, 2: 1.3, 4: 1.0}),
                        ("r1", "lora-ga", 1e-4, 0, [1.0, 0.9, 0.8, 0.7], {0: 2.0, 2: 1.2, 4: 0.9})])
    _synthetic_runs(b, [("r2", "lora-ga", 1e-4, 1, [1.2, 0.9, 0.8, 0.7], {0: 2.0, 2: 1.0, 4: 0.7}),
                        ("r2", "gaussian", 2e-3, 1, [2.0, 1.6, 1.3, 1.2], {0: 2.0, 2: 1.6, 4: 1.5})])
    # a run with another gradient-init scale (--gamma) is a variant of its own, not a third seed of lora-ga
    c = tmp_path / "c.jsonl"
    _synthetic_runs(c, [("r3", "lora-ga", 1e-4, 0, [1.1, 1.0, 0.9, 0.8], {0: 2.0, 2: 1.3, 4: 0.95})], gamma_override=4.0)
    assert rep.main([str(a), str(b), str(c), "--smooth", "1", "--out", str(tmp_path / "t.md")]) == 0
    text = (tmp_path / "t.md").read_text()
    rows = {line.split("|")[1].strip() + " " + line.split("|")[4].strip(): [c.strip() for c in line.split("|")[1:-1]]
            for line in text.splitlines() if line.startswith("| ") and not line.startswith("| method")}
    assert set(rows) == {"gaussian 0.001", "gaussian **0.002**", "lora-ga **0.0001**", "lora-ga (gamma 4) **0.0001**"}
    assert rows["lora-ga (gamma 4) **0.0001**"][4] == "0" and rows["lora-ga (gamma 4) **0.0001**"][7] == "0.950"
    ga = rows["lora-ga **0.0001**"]
    assert ga[4] == "0,1"                          # seeds 0 and 1 pooled across files; the unfinished run is left out
    assert ga[6] == "1.100 ± 0.100"                # held-out @2: mean of 1.2 and 1.0, population std 0.1
    assert ga[7] == "0.800 ± 0.100"                # @4: 0.9 and 0.7
    # the best lr is chosen on the seeds every lr has (seed 0: 1.0 < 1.1), not on unequal seed sets
    # (the mean over all seeds, 1.25, would have picked 1e-3)
    assert "gaussian **0.002**" in rows and rows["gaussian **0.002**"][7] == "1.250 ± 0.250"
    # steps to the baseline's final train loss, per seed against the same seed's baseline (seed 0: 0.9, seed 1: 1.2)
    assert "seed 0 0.900, seed 1 1.200" in text
    assert ga[8] == "2 / 1" and rows["gaussian 0.001"][8] == "-" and rows["gaussian **0.002**"][8] == "4 / 4"
    assert rows["gaussian 0.001"][2] == "-"        # vanilla LoRA has no gradient sample
    # the plot: per group, the seed-mean training curve (smoothed) and held-out points; best lrs solid
    fig = rep.figure(rep.collect(rep.read_rows([str(a), str(b), str(c)])), 1)
    ax_t, ax_e = fig.axes
    curves = {line.get_label(): (list(line.get_xdata()), list(line.get_ydata()), line.get_linestyle())
              for line in ax_t.get_lines() if not line.get_label().startswith("gaussian best-lr")}
    xs, ys, style = curves["lora-ga [16] lr 0.0001 (2 seeds)"]
    assert xs == [1, 2, 3, 4] and ys == pytest.approx([1.1, 0.9, 0.8, 0.7]) and style == "-"
    assert curves["gaussian lr 0.001 (1 seed)"][2] == "--"
    assert len(curves) == 4 and len(ax_e.get_lines()) == 4
    held = {line.get_label(): list(line.get_ydata()) for line in ax_e.get_lines()}
    assert held["lora-ga [16] lr 0.0001 (2 seeds)"] == pytest.approx([2.0, 1.1, 0.8])
    assert rep.main([str(tmp_path / "missing.jsonl")]) == 2
    assert "no such file" in capsys.readouterr().err


def test_bench_report_shows_lr_auto_runs_as_their_own_row_with_the_lrs_they_chose(tmp_path):
    rep = _load_report()
    a = tmp_path / "a.jsonl"
    _synthetic_runs(a, [("r1", "gaussian", 2e-3, 0, [2.0, 1.4, 1.1, 0.9], {0: 2.0, 2: 1.3, 4: 1.0}),
                        ("r1", "gaussian", "auto", 0, [2.0, 1.3, 1.0, 0.8], {0: 2.0, 2: 1.2, 4: 0.9}),
                        ("r1", "gaussian", "auto", 1, [2.0, 1.5, 1.2, 1.0], {0: 2.0, 2: 1.4, 4: 1.1})], found=(1.7e-3, 2.1e-3))
    assert rep.main([str(a), "--smooth", "1", "--out", str(tmp_path / "t.md")]) == 0
    text = (tmp_path / "t.md").read_text()
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[1:-1]]
            for line in text.splitlines() if line.startswith("| ") and not line.startswith("| method")}
    # seeds pooled under "auto" (each chose its own lr), never the baseline: that stays the grid run
    assert rows["gaussian lr auto"][3] == "auto (0.0017 / 0.0021)" and rows["gaussian lr auto"][4] == "0,1"
    assert rows["gaussian lr auto"][7] == "1.000 ± 0.100"
    assert rows["gaussian"][3] == "**0.002**" and "Baseline: gaussian at its best lr (0.002)" in text


def test_bench_report_auto_vs_grid_pairs_seeds_and_says_whether_the_best_lr_is_bracketed(tmp_path, capsys):
    rep = _load_report()
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    loss = [1.0, 1.0, 1.0, 1.0]
    # rank 8 (the most common setting): gaussian auto on seeds 0 and 1; 1e-3 (the fixed default) on seed 0 only
    _synthetic_runs(a, [("r1", "gaussian", "auto", 0, loss, {0: 2.0, 4: 0.92}),
                        ("r1", "gaussian", "auto", 1, loss, {0: 2.0, 4: 0.98}),
                        ("r1", "gaussian", 1e-3, 0, loss, {0: 2.0, 4: 1.00}),
                        ("r1", "gaussian", 2e-3, 0, loss, {0: 2.0, 4: 0.90}),
                        ("r1", "gaussian", 2e-3, 1, loss, {0: 2.0, 4: 1.00}),
                        ("r1", "gaussian", 4e-3, 0, loss, {0: 2.0, 4: 0.95}),
                        ("r1", "gaussian", 4e-3, 1, loss, {0: 2.0, 4: 0.96}),
                        ("r1", "lora-ga", 1e-4, 0, loss, {0: 2.0, 4: 0.90})], found=(1.7e-3, 2.1e-3))
    # rank 4: LoRA-One, its grid on seed 0 only and its best point at the edge of the grid
    _synthetic_runs(b, [("r2", "lora-one", "auto", 0, loss, {0: 2.0, 4: 0.85}),
                        ("r2", "lora-one", "auto", 1, loss, {0: 2.0, 4: 0.86}),
                        ("r2", "lora-one", 5e-4, 0, loss, {0: 2.0, 4: 0.95}),
                        ("r2", "lora-one", 2e-3, 0, loss, {0: 2.0, 4: 0.80})], found=(3.4e-3, 3.0e-3), rank=4)
    # the same init from another gradient-sample size is a row of its own, named by it
    c = tmp_path / "c.jsonl"
    _synthetic_runs(c, [("r3", "lora-one", "auto", 0, loss, {0: 2.0, 4: 0.87})], found=(3.1e-3,), rank=4, init_samples=32)
    assert rep.main([str(a), str(b), str(c), "--auto-vs-grid", "--out", str(tmp_path / "t.md")]) == 0
    text = (tmp_path / "t.md").read_text()
    assert "Common setting: 4 steps, micro-batch 2, grad-accum 1, max-length 64, 3 held-out, rank 8." in text
    rows = {tuple(c.strip() for c in line.split("|")[1:3]): [c.strip() for c in line.split("|")[3:-1]]
            for line in text.splitlines() if line.startswith("| ") and not line.startswith("| setting")}
    # lora-ga ran no auto: no row
    assert set(rows) == {("common setting", "gaussian"), ("rank 4", "lora-one"), ("rank 4", "lora-one, gradient sample 32")}
    assert rows[("rank 4", "lora-one, gradient sample 32")][1:] == ["0.0031 -> 0.8700", "0.0005 -> not run", "none", "-", "-"]
    seeds, auto, default, grid, d_gap, b_gap = rows[("common setting", "gaussian")]
    assert seeds == "0,1" and auto == "0.0017 / 0.0021 -> 0.9200 / 0.9800"
    assert default == "0.001 -> 1.0000 / -" and grid == "0.001: 1.0000 / -, 0.002: 0.9000 / 1.0000, 0.004: 0.9500 / 0.9600"
    assert d_gap == "-0.0800 (seed 0)"  # paired: only seed 0 has both
    # the best grid point among the lrs that ran both seeds: 2e-3 (auto - it: mean(+0.02, -0.02) = 0 against
    # 4e-3's mean(-0.03, +0.02) = -0.005); bracketed by 1e-3 (worse on seed 0) and 4e-3 (worse on both, on average)
    assert b_gap == "+0.0000 (best 0.002, bracketed)"
    seeds, auto, default, grid, d_gap, b_gap = rows[("rank 4", "lora-one")]
    assert seeds == "0,1" and auto == "0.0034 / 0.003 -> 0.8500 / 0.8600" and default == "0.0005 -> 0.9500 / -"
    assert d_gap == "-0.1000 (seed 0)"
    # no grid lr ran both seeds: the best is chosen among those paired with auto on any seed, and says on which
    assert b_gap == "+0.0500 (best 0.002, not bracketed: no worse lr on one side; seed 0)"
    # files without auto runs are an error, not an empty table
    d = tmp_path / "d.jsonl"
    _synthetic_runs(d, [("r4", "gaussian", 1e-3, 0, loss, {0: 2.0, 4: 1.0})])
    assert rep.main([str(d), "--auto-vs-grid"]) == 2
    assert "no finished --lr auto runs" in capsys.readouterr().err


def test_results_auto_vs_grid_table_is_the_report_of_the_committed_rows():
    rep = _load_report()
    rows = "docs/benchmarks/convergence-cpu-oos.jsonl"
    start = f"<!-- bench_report --auto-vs-grid {rows} -->"
    text = (ROOT / "docs" / "RESULTS.md").read_text(encoding="utf-8")
    assert start in text, "RESULTS 8.4 lost its table's marker"
    block = text.split(start, 1)[1].split("<!-- /bench_report -->", 1)[0]
    want = rep.auto_table(rep.collect(rep.read_rows([str(ROOT / rows)])))
    assert len(want) > 10 and block.strip().splitlines() == "\n".join(want).strip().splitlines()


def test_bench_svd_measures_the_randomized_svd_against_the_exact_one(tmp_path, tiny_model_dir, capsys):
    """benchmarks/bench_svd.py on the tiny model: a row per setting; the power iterations bring the randomized subspaces
    toward the exact ones (the measurement the init's SVD defaults rest on, RESULTS 14)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_svd", ROOT / "benchmarks" / "bench_svd.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "svd.jsonl"
    assert mod.main(["--model", str(tiny_model_dir), "--samples", "8", "--max-length", "64", "--rank", "2", "--niter", "0,4",
                     "--oversample", "2", "--device", "cpu", "--out", str(out)]) == 0
    rows = {r["niter"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert set(rows) == {0, 4} and all(r["q"] == 8 and r["modules"] == 21 for r in rows.values())
    for key in ("sin_V_median", "sin_U2_median", "s_rel_max"):
        assert 0 <= rows[4][key] < rows[0][key] <= 1.5, (key, rows[0][key], rows[4][key])
    assert "niter" in capsys.readouterr().out
