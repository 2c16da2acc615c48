#!/usr/bin/env python
"""GPU memory / speed benchmark: qlora-ga's gradient init and training step against PEFT's QLoRA.

    python benchmarks/bench_memory.py                                  # Llama-2-7B architecture, random weights, CUDA
    python benchmarks/bench_memory.py --tiny --device cpu --init-shapes 4x64 --train-shapes 1x64 --steps 2   # smoke run

One process measures, side by side (each in its own phase; peaks are reset between phases):

- ``init``: ``estimate_factors`` + ``init_adapters`` (lora-ga) on a sample batch of random token ids
  (every token a label) for each ``--init-shapes`` NxT: wall time, peak GPU memory
  (``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``), peak host RSS; and, as the
  yardstick, one gradient-checkpointed forward+backward over the same tokens (same micro-batch).
- ``ref_init``: the official-style LoRA-GA estimation: a bf16 (non-quantized) copy of the model with every
  target weight requiring grad, ``.grad`` accumulated over micro-batches of ``--init-micro-batch``, gradient
  checkpointing, then the same truncated SVD per weight. Out of memory is recorded as OOM.
- ``train``: tokens/s and peak memory of a training step (``qlora_ga.train.accumulate_gradients``, the training
  loop's own forward and backward with bf16 autocast on CUDA; gradient checkpointing, ``PagedAdamW32bit``,
  grad-norm clipping: the inner step of ``qlora_ga.train.train``) for
  ``qlora_ga`` (PEFT LoRA on the 4-bit model with the LoRA-GA init and its frozen residual),
  ``qlora_ga_no_residual`` (the same with ``detach_residual`` on every layer), and the two PEFT
  baselines: ``peft_qlora`` (``prepare_model_for_kbit_training`` + ``get_peft_model`` with
  ``LoraConfig(r, all 7 linears)``: PEFT's own QLoRA recipe, which also upcasts the non-quantized weights
  to fp32) and ``peft_qlora_no_prepare`` (``get_peft_model`` alone; users run both). All use one step
  function, so only the model set-up differs. PEFT is also run at the init's micro-batch shape
  (``{init micro-batch}xT``) for the memory target.
- ``liger`` (CUDA with ``liger-kernel`` installed, or ``--liger on``): ``qlora_ga_liger``, the qlora-ga
  training step with Liger Kernel's fused kernels (``qlora_ga.kernels.apply_liger``). Run last: Liger
  patches transformers' model code for the whole process.

Then it prints tables, the ratios and PASS/MISS for its targets (listed in the summary), and appends one JSON row per
measurement to ``--out`` (each with device name, torch/bitsandbytes/transformers/peft versions, date and
command line). A phase that raises (not out of memory, which is a measured result) is recorded as an
``error`` row and the others still run; ``--summarize-only`` prints the summary of a run that was stopped
before its own (from its rows in ``--out``).

How the model is made (``--materialize``; ``qlora_ga.synthetic``): ``direct`` (default) builds the Llama-2-7B architecture
(hidden 4096, 32 layers, 32 heads, intermediate 11008, vocab 32000) on the ``meta`` device and then
materializes it one decoder layer at a time on the target device with random N(0, 0.02) weights,
quantizing each target linear at once into a bitsandbytes NF4 ``Linear4bit`` (double quantization,
blocksize 64: the same settings as ``qlora_ga.model.load_model``) with ``Params4bit(...).to(device)``.
Nothing is written to disk and the peak while building is the 4-bit model plus one bf16 layer
(~0.4 GB), so it also builds on a 24 GB card. The model is marked ``is_loaded_in_4bit`` like a
transformers-loaded one, so PEFT dispatches its bitsandbytes LoRA layers. ``disk`` instead writes the
random model once as a bf16 safetensors folder under ``--workdir`` (13 GB for 7B; the host builds it in
RAM) and loads it with ``qlora_ga.model.load_model`` (the package's real loading path). ``--model``
benchmarks a real checkpoint (hub id, folder or .gguf) through ``load_model`` instead.

Memory notes: the paged optimizer's states live in CUDA unified memory, which
``max_memory_allocated`` does not count (the same for both implementations; LoRA r=8 on 7B: ~0.16 GB).
Host RSS peaks are reset per phase through ``/proc/self/clear_refs`` where Linux allows it (else
they are the process maximum so far: ``rss_peak_resettable`` says which). The state store of the
gradient pass takes what fits in free GPU memory by default; ``--state-budget-gib`` caps it (as a
24 GB card would), which decides the init's peak on a large card.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import shlex
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_common import device_name, quiet, versions as _versions  # noqa: E402

import torch  # noqa: E402

from qlora_ga.synthetic import ARCHS, ModelFactory, free_memory, random_batch, random_sequences  # noqa: E402

GIB = 2**30
FULL_DEFAULTS = dict(init_shapes="64x512,128x1024", train_shapes="1x1024,4x512,4x1024", warmup=2, steps=5)
TINY_DEFAULTS = dict(init_shapes="4x64", train_shapes="1x64", warmup=1, steps=2)
PARTS = ("init", "ref", "train", "peft", "residual", "liger")
PEFT_IMPLS = {"kbit": "peft_qlora", "none": "peft_qlora_no_prepare"}


# ----------------------------------------------------------------------------- arguments


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="4-layer hidden-256 Llama instead of Llama-2-7B (CPU ok)")
    p.add_argument("--arch", choices=tuple(ARCHS), default="llama2-7b", help="shape of the random Llama (default llama2-7b)")
    p.add_argument("--layers", type=int, default=None, help="decoder layers of the random Llama (default: the --arch's own)")
    p.add_argument("--gpu-memory-cap-gib", type=float, default=None,
                   help="cap the process's GPU memory (torch.cuda.set_per_process_memory_fraction), e.g. 48 for a 48 GB card")
    p.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: cuda if available)")
    p.add_argument("--model", default=None, help="benchmark this checkpoint (hub id, folder, .gguf) instead of a random Llama")
    p.add_argument("--materialize", choices=("direct", "disk"), default="direct",
                   help="direct: build the random model in 4-bit on the device; disk: save it under --workdir and load_model it")
    p.add_argument("--workdir", default="./.bench", help="scratch folder (the random model with --materialize disk)")
    p.add_argument("--out", default="docs/benchmarks/memory.jsonl", help="JSONL file the rows are appended to")
    p.add_argument("--init-shapes", default=None, help="sample batches NxT (sequences x tokens), comma-separated "
                   f"(default {FULL_DEFAULTS['init_shapes']}; --tiny {TINY_DEFAULTS['init_shapes']})")
    p.add_argument("--ref-shapes", default=None, help="shapes for the official-style bf16 estimation (default: the first init shape)")
    p.add_argument("--init-micro-batch", type=int, default=8, help="micro-batch of the gradient pass and of the reference")
    p.add_argument("--train-shapes", default=None, help="training micro-batches BxT, comma-separated "
                   f"(default {FULL_DEFAULTS['train_shapes']}; --tiny {TINY_DEFAULTS['train_shapes']})")
    p.add_argument("--warmup", type=int, default=None, help="untimed training steps per shape (default 2; --tiny 1)")
    p.add_argument("--steps", type=int, default=None, help="timed training steps per shape (default 5; --tiny 2)")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument("--optim", default="paged_adamw_32bit", help="optimizer of both training steps (qlora_ga.train.build_optimizer)")
    p.add_argument("--peft-prepare", choices=("both", "kbit", "none"), default="both",
                   help="PEFT baselines: kbit: with prepare_model_for_kbit_training (upcasts non-4-bit weights to fp32); "
                        "none: without it; both (default)")
    p.add_argument("--liger", choices=("auto", "on", "off"), default="auto",
                   help="also measure qlora-ga with Liger Kernel's fused kernels; auto: on CUDA when liger-kernel is installed")
    p.add_argument("--state-budget-gib", type=float, default=None, help="cap on the gradient pass's state store (default: automatic)")
    p.add_argument("--state-device", default=None, help="where the gradient pass stores block inputs (default: automatic)")
    p.add_argument("--skip", default="", help=f"comma-separated parts to skip: {', '.join(PARTS)}")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--summarize-only", action="store_true",
                   help="measure nothing: print the tables and append the target rows of the newest run in --out "
                        "(one stopped part-way, say); pass the shape options that run had")
    args = p.parse_args(argv)
    d = TINY_DEFAULTS if args.tiny else FULL_DEFAULTS
    for k, v in d.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    args.init_shapes = parse_shapes(args.init_shapes)
    args.train_shapes = parse_shapes(args.train_shapes)
    args.ref_shapes = parse_shapes(args.ref_shapes) if args.ref_shapes else args.init_shapes[:1]
    args.skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    bad = args.skip - set(PARTS)
    if bad:
        p.error(f"--skip: unknown part(s) {sorted(bad)}; choose from {', '.join(PARTS)}")
    if args.summarize_only:
        return args
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error(f"--device {args.device}: no CUDA GPU is available (use --device cpu)")
    if args.liger == "auto":
        args.liger = "on" if args.device.startswith("cuda") and _liger_installed() else "off"
    elif args.liger == "on":
        from qlora_ga.errors import QloraGaError
        from qlora_ga.kernels import check_liger

        try:
            check_liger(args.device)
        except QloraGaError as e:
            p.error(str(e))
    return args


def _liger_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("liger_kernel") is not None


def parse_shapes(text: str) -> list[tuple[int, int]]:
    out = []
    for part in text.split(","):
        part = part.strip().lower()
        if not part:
            continue
        try:
            n, t = (int(x) for x in part.split("x"))
        except ValueError:
            raise SystemExit(f"error: bad shape '{part}': use NxT, e.g. 64x512") from None
        if n < 1 or t < 2:
            raise SystemExit(f"error: bad shape '{part}': need N >= 1 and T >= 2")
        out.append((n, t))
    if not out:
        raise SystemExit("error: no shapes given")
    return out


def shape_str(s) -> str:
    return f"{s[0]}x{s[1]}"


# ----------------------------------------------------------------------------- measuring




def _reset_rss_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM (Linux >= 4.0)
        return True
    except OSError:
        return False


def _rss_peak_bytes() -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    except ImportError:  # pragma: no cover
        return None


def sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def is_oom(e: BaseException) -> bool:
    return isinstance(e, (torch.cuda.OutOfMemoryError, MemoryError)) or "out of memory" in str(e).lower()


class Meter:
    """Wall time, peak GPU memory (reset on entry) and peak host RSS (reset where Linux allows) of a block."""

    def __init__(self, device: torch.device):
        self.device = device
        self.seconds = None
        self.peak_gpu = None
        self.peak_rss = None
        self.rss_resettable = False

    def __enter__(self):
        free_memory(self.device)
        sync(self.device)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self.rss_resettable = _reset_rss_peak()
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        sync(self.device)
        self.seconds = time.perf_counter() - self.t0
        if self.device.type == "cuda":
            self.peak_gpu = int(torch.cuda.max_memory_allocated(self.device))
        self.peak_rss = _rss_peak_bytes()
        return False

    def fields(self) -> dict:
        return {"wall_s": _r(self.seconds), "peak_gpu_bytes": self.peak_gpu, "peak_gpu_gib": _gib(self.peak_gpu),
                "peak_rss_bytes": self.peak_rss, "peak_rss_gib": _gib(self.peak_rss),
                "rss_peak_resettable": self.rss_resettable}


def _gib(b):
    return None if b is None else round(b / GIB, 3)


def _r(x, n=4):
    return None if x is None else round(float(x), n)


class Recorder:
    """Appends rows (with the run's metadata) to the JSONL file and keeps them for the summary."""

    def __init__(self, path: str, meta: dict):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.meta = meta
        self.rows: list[dict] = []

    def add(self, **row) -> dict:
        row = {"bench": "memory", **row, **self.meta}
        self.rows.append(row)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row, default=str) + "\n")
        return row

    def find(self, **match) -> dict | None:
        for r in self.rows:
            if all(r.get(k) == v for k, v in match.items()):
                return r
        return None


def say(msg: str):
    print(msg, flush=True)


# ----------------------------------------------------------------------------- the measured steps


def fwd_bwd(model, item: dict, device, dtype):
    """One gradient-checkpointed forward+backward over the micro-batches of ``item`` (``qlora_ga.train.step_item``):
    the training loop's own ``accumulate_gradients`` (token-weighted loss), no optimizer step."""
    from qlora_ga.train import accumulate_gradients

    model.train()
    accumulate_gradients(model, item, device, dtype)
    model.zero_grad(set_to_none=True)


def train_steps(model, optimizer, item: dict, device, dtype, n: int, max_grad_norm: float = 1.0) -> float:
    """``n`` optimizer steps on ``item`` (``qlora_ga.train.step_item`` of the step's micro-batches): the training
    loop's ``accumulate_gradients`` (forward and backward, as ``qlora_ga.train.train`` runs them), grad-norm
    clipping and the optimizer step. Returns the last step's loss (one host sync, at the end)."""
    from qlora_ga.train import accumulate_gradients, trainable_parameters

    params = trainable_parameters(model)
    loss = torch.zeros(())
    for _ in range(n):
        loss = accumulate_gradients(model, item, device, dtype)
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return float(loss)


def bench_train(rec: Recorder, impl: str, model, optimizer, shape, args, device, dtype, vocab: int, role: str = "train"):
    from qlora_ga.train import step_item

    b, t = shape
    row = dict(part="train", impl=impl, shape=shape_str(shape), role=role, tokens_per_step=b * t,
               warmup=args.warmup, steps=args.steps)
    try:
        item = step_item([random_batch(b, t, vocab, args.seed + 1, device)])
        train_steps(model, optimizer, item, device, dtype, args.warmup)
        with Meter(device) as m:
            loss = train_steps(model, optimizer, item, device, dtype, args.steps)
        step_s = m.seconds / args.steps
        row.update(m.fields(), step_s=_r(step_s), tokens_per_s=_r(b * t / step_s, 1), loss=_r(loss), oom=False)
    except Exception as e:  # noqa: BLE001
        if not is_oom(e):
            raise
        optimizer.zero_grad(set_to_none=True)
        free_memory(device)
        row.update(oom=True, tokens_per_s=None, peak_gpu_gib=None, error=str(e).splitlines()[0][:200])
    say(f"  train {impl:<22} {row['shape']:>9}: " + ("OOM" if row["oom"] else
        f"{row['tokens_per_s']:>9.1f} tok/s, peak GPU {row.get('peak_gpu_gib')} GiB, peak RSS {row.get('peak_rss_gib')} GiB"))
    return rec.add(**row)


# ----------------------------------------------------------------------------- phases


def phase_ours(rec: Recorder, factory: ModelFactory, args, device):
    from qlora_ga.estimate import PassReport, describe_plan, estimate_factors, make_micro_batches
    from qlora_ga.init import init_adapters, lora_layers, singular_vectors_needed
    from qlora_ga.residual import attach_residual, detach_residual, has_residual
    from qlora_ga.train import TrainSettings, build_optimizer, checkpointing, step_item

    dtype = factory.compute_dtype
    with Meter(device) as m:
        model = factory.quantized()
    rec.add(part="model", variant="4bit", build_s=_r(m.seconds), model_bytes=int(model.get_memory_footprint()),
            n_layers=int(model.config.num_hidden_layers), build_peak_rss_gib=_gib(m.peak_rss),
            gpu_bytes=int(torch.cuda.memory_allocated(device)) if device.type == "cuda" else None,
            gpu_gib=_gib(torch.cuda.memory_allocated(device)) if device.type == "cuda" else None)
    say(f"4-bit model ready in {m.seconds:.1f} s" + (f", {torch.cuda.memory_allocated(device) / GIB:.2f} GiB on the GPU"
                                                    if device.type == "cuda" else ""))
    vocab = factory.vocab_size
    budget = int(args.state_budget_gib * GIB) if args.state_budget_gib is not None else None
    # warm-up, not recorded: first CUDA/cuBLAS/cuSOLVER calls, bitsandbytes kernels, autograd threads
    warm = random_sequences(2, 64, vocab, args.seed + 7)
    estimate_factors(model, warm, rank=args.rank, n_vectors=singular_vectors_needed("lora-ga", args.rank),
                     micro_batch_size=2, pad_token_id=0, progress=False)
    del warm
    sync(device)
    pm = None
    # with --skip init the adapters for the training step still come from a (small, unrecorded) gradient pass
    shapes = args.init_shapes if "init" not in args.skip else [min(args.init_shapes, key=lambda s: s[0] * s[1])]
    for i, shape in enumerate(shapes):
        n, t = shape
        examples = random_sequences(n, t, vocab, args.seed)
        report = PassReport()
        row = dict(part="init", impl="qlora_ga", method="lora-ga", shape=shape_str(shape), tokens=n * t,
                   micro_batch=args.init_micro_batch, rank=args.rank, measured="init" not in args.skip)
        try:
            with Meter(device) as m:
                t0 = time.perf_counter()
                factors = estimate_factors(model, examples, rank=args.rank,
                                           n_vectors=singular_vectors_needed("lora-ga", args.rank),
                                           micro_batch_size=args.init_micro_batch, pad_token_id=0, progress=False,
                                           report=report, state_budget_bytes=budget, state_device=args.state_device)
                sync(device)
                t1 = time.perf_counter()
                pm = init_adapters(model, factors, method="lora-ga", rank=args.rank, alpha=args.alpha)
            row.update(m.fields(), estimate_s=_r(t1 - t0), init_adapters_s=_r(m.seconds - (t1 - t0)),
                       state_device=report.state_device, state_stride=report.state_stride,
                       state_gib_per_layer=_gib(report.state_bytes_per_layer), reserve_gib=_gib(report.reserve_bytes),
                       train_floor_gib=_gib(report.train_floor_bytes), store_copy_gib=_gib(report.store_copy_bytes),
                       recomputed_blocks=report.recomputed_blocks, plan=describe_plan(report, str(device)),
                       max_block_grad_gib=_gib(report.max_block_grad_bytes), sample_loss=_r(report.loss), oom=False)
            del factors
        except Exception as e:  # noqa: BLE001
            if not is_oom(e):
                raise
            free_memory(device)
            row.update(oom=True, error=str(e).splitlines()[0][:200])
            if report.n_blocks:  # planned before it ran out: what the peak was to hold
                row.update(plan=describe_plan(report, str(device)), reserve_gib=_gib(report.reserve_bytes),
                           max_block_grad_gib=_gib(report.max_block_grad_bytes), state_device=report.state_device,
                           state_stride=report.state_stride, state_gib_per_layer=_gib(report.state_bytes_per_layer))
            rec.add(**row)
            say(f"  init {row['shape']}: OOM" + (f" ({row['plan']})" if row.get("plan") else ""))
            continue
        # the yardstick: one checkpointed forward+backward over the same tokens, same micro-batch
        batches = make_micro_batches(examples, args.init_micro_batch, 0)
        checkpointing(pm, True)
        try:
            if i == 0:  # warm-up of the checkpointed backward, not timed
                fwd_bwd(pm, step_item(batches[:1]), device, dtype)
            item = step_item(batches)
            with Meter(device) as f:
                fwd_bwd(pm, item, device, dtype)
            row.update(fwdbwd_s=_r(f.seconds), fwdbwd_peak_gpu_gib=_gib(f.peak_gpu),
                       init_over_fwdbwd=_r(row["wall_s"] / f.seconds, 3))
        except Exception as e:  # noqa: BLE001
            if not is_oom(e):
                raise
            free_memory(device)
            row.update(fwdbwd_s=None, fwdbwd_oom=True)
        checkpointing(pm, False)
        pm.eval()
        if row["measured"]:
            rec.add(**row)
            say(f"  init {row['shape']:>9}: {row['wall_s']:.2f} s (fwd+bwd {row.get('fwdbwd_s')} s), peak GPU "
                f"{row['peak_gpu_gib']} GiB, peak RSS {row['peak_rss_gib']} GiB, states on {report.state_device} "
                f"stride {report.state_stride}")
        if i < len(shapes) - 1:
            model = pm.unload()
            pm = None
        del examples, batches
        free_memory(device)

    want_train = not {"train", "residual"} <= args.skip
    if pm is None and want_train:  # the last init shape ran out of memory: adapters from a small sample
        say("  (adapters for the training step from a 2x64 sample)")
        factors = estimate_factors(model, random_sequences(2, 64, vocab, args.seed), rank=args.rank,
                                   n_vectors=singular_vectors_needed("lora-ga", args.rank), progress=False)
        pm = init_adapters(model, factors, method="lora-ga", rank=args.rank, alpha=args.alpha)
        del factors
    if want_train:
        settings = TrainSettings(optim=args.optim, lr=5e-5)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            optimizer = build_optimizer(pm, settings, device)
        checkpointing(pm, True)
        pm.train()
        layers = [layer for layer in lora_layers(pm).values() if has_residual(layer)]
        saved = [(layer, layer.qlora_ga_A0, layer.qlora_ga_B0) for layer in layers]
        for shape in args.train_shapes:
            if "train" not in args.skip:
                bench_train(rec, "qlora_ga", pm, optimizer, shape, args, device, dtype, vocab)
            if "residual" not in args.skip:
                for layer in layers:
                    detach_residual(layer)
                bench_train(rec, "qlora_ga_no_residual", pm, optimizer, shape, args, device, dtype, vocab)
                for layer, a0, b0 in saved:
                    attach_residual(layer, a0, b0, dtype=a0.dtype)
        del optimizer, saved, layers
        checkpointing(pm, False)
    del pm, model
    free_memory(device)


def phase_peft(rec: Recorder, factory: ModelFactory, args, device, prepare: str = "kbit"):
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    from qlora_ga.arch import resolve_targets
    from qlora_ga.train import TrainSettings, build_optimizer
    from qlora_ga.train import checkpointing

    dtype = factory.compute_dtype
    model = factory.quantized()
    if prepare == "kbit":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
    cfg = LoraConfig(r=args.rank, lora_alpha=args.alpha, lora_dropout=0.0, target_modules=list(resolve_targets(model)),
                     bias="none", task_type="CAUSAL_LM")
    pm = get_peft_model(model, cfg)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        optimizer = build_optimizer(pm, TrainSettings(optim=args.optim, lr=1e-4), device)
    checkpointing(pm, True)
    pm.train()
    shapes = [(s, "train") for s in args.train_shapes]
    for n, t in args.init_shapes if prepare == "kbit" else ():  # the memory target: the init vs training at its micro-batch
        s = (args.init_micro_batch, t)
        if s not in args.train_shapes and s not in [x for x, _ in shapes]:
            shapes.append((s, "init-compare"))
    for shape, role in shapes:
        bench_train(rec, PEFT_IMPLS[prepare], pm, optimizer, shape, args, device, dtype, factory.vocab_size, role=role)
    del optimizer, pm, model
    free_memory(device)


def phase_liger(rec: Recorder, factory: ModelFactory, args, device):
    """qlora-ga's training step with Liger Kernel's fused kernels (run last: Liger patches transformers' code)."""
    from qlora_ga.estimate import estimate_factors
    from qlora_ga.init import init_adapters, singular_vectors_needed
    from qlora_ga.kernels import apply_liger
    from qlora_ga.train import TrainSettings, build_optimizer
    from qlora_ga.train import checkpointing

    dtype = factory.compute_dtype
    model = factory.quantized()
    apply_liger(model, device)
    # adapters from a small sample: the step's speed does not depend on their values
    factors = estimate_factors(model, random_sequences(2, 64, factory.vocab_size, args.seed), rank=args.rank,
                               n_vectors=singular_vectors_needed("lora-ga", args.rank), progress=False)
    pm = init_adapters(model, factors, method="lora-ga", rank=args.rank, alpha=args.alpha)
    del factors
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        optimizer = build_optimizer(pm, TrainSettings(optim=args.optim, lr=5e-5), device)
    checkpointing(pm, True)
    pm.train()
    for shape in args.train_shapes:
        bench_train(rec, "qlora_ga_liger", pm, optimizer, shape, args, device, dtype, factory.vocab_size)
    del optimizer, pm, model
    free_memory(device)


def phase_reference(rec: Recorder, factory: ModelFactory, args, device):
    """Official-style LoRA-GA estimation: full-precision .grad on every target weight of a bf16 model."""
    from qlora_ga.data import count_label_tokens
    from qlora_ga.estimate import make_micro_batches, truncated_svd
    from qlora_ga.arch import target_linears
    from qlora_ga.train import checkpointing

    model = None
    for shape in args.ref_shapes:
        n, t = shape
        row = dict(part="ref_init", impl="official_style_bf16", method="lora-ga", shape=shape_str(shape), tokens=n * t,
                   micro_batch=args.init_micro_batch, dtype=str(factory.ref_dtype).replace("torch.", ""))
        try:
            if model is None:
                model = factory.reference()
                targets = target_linears(model)
                for p in model.parameters():
                    p.requires_grad_(False)
                for mod in targets.values():
                    mod.weight.requires_grad_(True)
                checkpointing(model, True)
                model.train()
            batches = make_micro_batches(random_sequences(n, t, factory.vocab_size, args.seed), args.init_micro_batch, 0)
            n_total = sum(count_label_tokens(b["labels"]) for b in batches)
            k = 2 * args.rank
            with Meter(device) as m:
                for b in batches:
                    b = {key: v.to(device) for key, v in b.items()}
                    w = count_label_tokens(b["labels"]) / n_total
                    loss = model(**b).loss * w
                    loss.backward()  # .grad accumulates on every target weight
                    del loss
                for mod in targets.values():
                    truncated_svd(mod.weight.grad.float(), k)
                    mod.weight.grad = None
            row.update(m.fields(), oom=False)
        except Exception as e:  # noqa: BLE001
            if not is_oom(e):
                raise
            if model is not None:
                model.zero_grad(set_to_none=True)
            free_memory(device)
            row.update(oom=True, wall_s=None, peak_gpu_gib=None, error=str(e).splitlines()[0][:200])
        rec.add(**row)
        say(f"  ref init {row['shape']:>9}: " + ("OOM" if row["oom"] else
            f"{row['wall_s']:.2f} s, peak GPU {row['peak_gpu_gib']} GiB, peak RSS {row['peak_rss_gib']} GiB"))
    del model
    free_memory(device)


# ----------------------------------------------------------------------------- summary


def _mem_key(device) -> str:
    return "peak_gpu_gib" if device.type == "cuda" else "peak_rss_gib"


def _fmt(x, spec=".3f"):
    return "-" if x is None else (x if isinstance(x, str) else format(x, spec))


def summarize(rec: Recorder, args, device):
    mk = _mem_key(device)
    mem_name = "GPU" if device.type == "cuda" else "host RSS"
    targets = []

    def target(name, shape, value, op, threshold, note=""):
        ok = None if value is None else (value <= threshold if op == "<=" else value >= threshold if op == ">=" else value < threshold)
        targets.append(rec.add(part="target", target=name, shape=shape, value=_r(value, 4), op=op, threshold=threshold,
                               passed=ok, note=note))

    say("\n== gradient init (LoRA-GA, rank %d, micro-batch %d) ==" % (args.rank, args.init_micro_batch))
    say(f"{'shape':>9} {'ours s':>9} {'fwd+bwd s':>9} {'ratio':>6} {'ours peak':>10} {'ref s':>9} {'ref peak':>10} "
        f"{'PEFT peak':>10}  ({mem_name}, GiB)")
    for shape in args.init_shapes:
        s = shape_str(shape)
        ours = rec.find(part="init", shape=s) or {}
        ref = rec.find(part="ref_init", shape=s) or {}
        peft = rec.find(part="train", impl="peft_qlora", shape=shape_str((args.init_micro_batch, shape[1]))) or {}
        say(f"{s:>9} {_fmt(ours.get('wall_s'), '.2f'):>9} {_fmt(ours.get('fwdbwd_s'), '.2f'):>9} "
            f"{_fmt(ours.get('init_over_fwdbwd'), '.2f'):>6} {_fmt(ours.get(mk)):>10} "
            f"{_fmt('OOM' if ref.get('oom') else ref.get('wall_s'), '.2f'):>9} "
            f"{_fmt('OOM' if ref.get('oom') else ref.get(mk)):>10} {_fmt('OOM' if peft.get('oom') else peft.get(mk)):>10}")
        if ours:
            pk = peft.get(mk)
            target("init peak <= PEFT QLoRA training peak at the init micro-batch", s,
                   ours.get(mk) / pk if ours.get(mk) is not None and pk else None, "<=", 1.0,
                   note=f"ratio of {mem_name} peaks; PEFT at {shape_str((args.init_micro_batch, shape[1]))}")
            target("init wall <= 2x one checkpointed fwd+bwd over the sample tokens", s, ours.get("init_over_fwdbwd"), "<=", 2.0)
            if ref and not ref.get("oom") and ours.get(mk) and ref.get(mk):
                rec.add(part="ratio", ratio="init_peak_over_reference_peak", shape=s, value=_r(ours[mk] / ref[mk], 4))

    say("\n== training step (tokens/s; peak %s GiB) ==" % mem_name)
    say("PEFT: with prepare_model_for_kbit_training; PEFT-np: without it")
    say(f"{'shape':>9} {'ours':>9} {'no resid':>9} {'PEFT':>9} {'PEFT-np':>9} {'Liger':>9} {'/PEFT':>7} {'/PEFT-np':>8} "
        f"{'overhead':>9} {'ours peak':>10} {'PEFT peak':>10}")

    def tps(row):
        return _fmt("OOM" if row.get("oom") else row.get("tokens_per_s"), ".1f")

    def over(a, b):
        return a["tokens_per_s"] / b["tokens_per_s"] if a.get("tokens_per_s") and b.get("tokens_per_s") else None

    for shape in args.train_shapes:
        s = shape_str(shape)
        o = rec.find(part="train", impl="qlora_ga", shape=s) or {}
        d = rec.find(part="train", impl="qlora_ga_no_residual", shape=s) or {}
        p = rec.find(part="train", impl="peft_qlora", shape=s) or {}
        pn = rec.find(part="train", impl="peft_qlora_no_prepare", shape=s) or {}
        lg = rec.find(part="train", impl="qlora_ga_liger", shape=s) or {}
        ratio, ratio_np, overhead = over(o, p), over(o, pn), over(d, o)
        overhead = None if overhead is None else overhead - 1
        say(f"{s:>9} {tps(o):>9} {tps(d):>9} {tps(p):>9} {tps(pn):>9} {tps(lg):>9} {_fmt(ratio, '.3f'):>7} "
            f"{_fmt(ratio_np, '.3f'):>8} {_fmt(None if overhead is None else f'{100 * overhead:+.2f}%'):>9} "
            f"{_fmt(o.get(mk)):>10} {_fmt(p.get(mk)):>10}")
        for name, value in (("ours_over_peft", ratio), ("ours_over_peft_no_prepare", ratio_np),
                            ("liger_over_peft", over(lg, p)), ("liger_over_peft_no_prepare", over(lg, pn)),
                            ("liger_over_ours", over(lg, o))):
            if value is not None:
                rec.add(part="ratio", ratio=f"train_tokens_per_s_{name}", shape=s, value=_r(value, 4))
        if o or p:
            target("training tokens/s >= 1.0x PEFT QLoRA (prepare_model_for_kbit_training)", s, ratio, ">=", 1.0)
        if o or pn:
            target("training tokens/s >= 1.0x PEFT QLoRA (no prepare)", s, ratio_np, ">=", 1.0)
        if o or d:
            target("residual overhead < 3%", s, overhead, "<", 0.03, note="tokens/s without residual / with - 1")

    say("\n== targets ==")
    for t in targets:
        verdict = "n/a" if t["passed"] is None else ("PASS" if t["passed"] else "MISS")
        say(f"  [{verdict:>4}] {t['target']} ({t['shape']}): value {_fmt(t['value'], '.3f')} {t['op']} {t['threshold']}")
    if device.type != "cuda":
        say("  (CPU run: a smoke test of the code paths, not evidence)")
    return targets


# ----------------------------------------------------------------------------- main


def summarize_file(args) -> int:
    """``--summarize-only``: the summary and targets of the newest run in ``--out`` from its rows alone."""
    from qlora_ga.metrics import read_metrics

    path = Path(args.out)
    rows = read_metrics(path)  # (the last line of a killed run may be cut: skipped)
    if not rows:
        raise SystemExit(f"error: no rows in {path}: run the benchmark first")
    rows = [r for r in rows if r.get("run_id") == rows[-1].get("run_id")]
    if any(r.get("part") == "target" for r in rows):
        say(f"run {rows[-1].get('run_id')} in {path} is already summarized: nothing appended")
        return 0
    first = rows[0]
    meta = {k: v for k, v in first.items()
            if k in ("device", "device_type", "date", "command", "run_id", "model", "rank") or k.endswith("_version")}
    meta["summarized_from_rows"] = True  # the run itself stopped before its summary
    rec = Recorder(args.out, meta)
    rec.rows = rows
    say(f"summary of run {meta.get('run_id')} ({len(rows)} rows in {path}; the run stopped before its own summary)")
    summarize(rec, args, torch.device(first.get("device_type") or "cpu"))
    return 0


def main(argv=None) -> int:
    quiet()
    args = parse_args(argv)
    if args.summarize_only:
        return summarize_file(args)
    from qlora_ga.model import as_device

    device = as_device(args.device)
    torch.manual_seed(args.seed)
    meta = {
        "device": device_name(device), "device_type": device.type, **{f"{k}_version": v for k, v in _versions().items()},
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join([os.path.basename(sys.executable)] + sys.argv if argv is None else ["bench_memory.py", *argv]),
        "run_id": f"{int(time.time())}-{os.getpid()}",
    }
    if args.gpu_memory_cap_gib is not None and device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.gpu_memory_cap_gib * GIB / total), device)
        meta["gpu_memory_cap_gib"] = args.gpu_memory_cap_gib
    factory = ModelFactory(device, model=args.model, tiny=args.tiny, arch=args.arch, layers=args.layers,
                           materialize=args.materialize, workdir=args.workdir, seed=args.seed)
    meta["model"] = factory.label
    meta["rank"] = args.rank
    rec = Recorder(args.out, meta)
    say(f"bench_memory: {factory.label} on {meta['device']}; torch {meta['torch_version']}, bitsandbytes "
        f"{meta['bitsandbytes_version']}, transformers {meta['transformers_version']}, peft {meta['peft_version']}")
    t0 = time.perf_counter()
    failed = []

    def phase(name: str, fn, *extra):
        """Run one phase; an exception (not OOM, which the phases record themselves) is recorded as an ``error``
        row and the run goes on, so one broken phase does not cost the others' rows and the summary."""
        try:
            fn(rec, factory, args, device, *extra)
        except Exception as e:  # noqa: BLE001
            import traceback

            traceback.print_exc()
            failed.append(name)
            rec.add(part="error", phase=name, error=f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:300]}")
            say(f"  phase {name} FAILED: {type(e).__name__}: {(str(e).splitlines() or [''])[0][:300]}")
            free_memory(device)

    if not ({"init", "train", "residual"} <= args.skip):
        say("-- qlora-ga: gradient init, training step, residual overhead")
        phase("ours", phase_ours)
    if "peft" not in args.skip:
        for prepare in ("kbit", "none") if args.peft_prepare == "both" else (args.peft_prepare,):
            say(f"-- PEFT QLoRA training step ({'prepare_model_for_kbit_training' if prepare == 'kbit' else 'no prepare'})")
            phase(PEFT_IMPLS[prepare], phase_peft, prepare)
    if "ref" not in args.skip:
        say("-- official-style LoRA-GA estimation (bf16 model, .grad on every target weight)")
        phase("ref", phase_reference)
    if args.liger == "on" and "liger" not in args.skip:
        say("-- qlora-ga training step with Liger Kernel")
        phase("liger", phase_liger)
    summarize(rec, args, device)
    say(f"\n{len(rec.rows)} rows appended to {args.out} ({time.perf_counter() - t0:.1f} s)")
    if failed:
        say(f"phases that failed (tracebacks above): {', '.join(failed)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
