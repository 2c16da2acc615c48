#!/usr/bin/env python
"""Training-step speed, interleaved: qlora-ga with its residual, without it, and PEFT's QLoRA with and
without ``prepare_model_for_kbit_training``, timed round-robin in one process.

    python benchmarks/bench_step.py --model SmolLM2.gguf --device cpu --shape 4x256 --rounds 8
    python benchmarks/bench_step.py --shape 4x1024 --rounds 30 --compile --fused --profile     # 7B shape on a GPU

Optional rows, each timed in the same rotation: ``--compile`` (the blocks compiled), ``--fused`` (``--fused-lora``;
with ``--compile`` also both), ``--liger`` (CUDA: a Liger Kernel model); every row's median, quartiles and its
ratios to the eager step and to both PEFT baselines are printed and kept in the summary row. ``--profile`` adds
torch.profiler tables of one training step and of the gradient pass.

``bench_memory.py`` measures each implementation in its own phase, one after the other; on a shared
machine whose load drifts, the ratios then carry that drift. Here the models are built once, side by
side, and each round times one optimizer step of each (the same step function as ``bench_memory``: the
training loop's ``qlora_ga.train.accumulate_gradients`` with its autocast on CUDA, gradient checkpointing,
grad-norm clipping, the optimizer), in a rotating order.
The median over rounds is reported per implementation, with the ratios; one JSON row per step and
one summary row are appended to ``--out``. The residual on/off rows share one model (the residual is
detached and re-attached between them), so they differ only in the residual.

With ``--data FILE`` (real sequences, e.g. GSM8K) it compares instead how each micro-batch is laid out,
round-robin in the same way: qlora-ga's padded step, its padding-free step (the same
sequences flattened into one row), its packed step (``--shape BxT``: B rows of T tokens, whole sequences,
best-fit decreasing) and PEFT QLoRA's padded step (``prepare_model_for_kbit_training``). Round r gives the
padded, padding-free and PEFT steps the same sequences (micro-batch r of the seeded order) and the packed
step its r-th micro-batch of rows; the measure is **useful tokens/s** (the sequences' own tokens, no
padding) per optimizer step, medians over rounds, with the ratios to the padded step and to PEFT's:

    python benchmarks/bench_step.py --model SmolLM2.gguf --device cpu --data gsm8k/train.jsonl --shape 4x256 --rounds 6
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import os
import shlex
import statistics
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_common import device_name, quiet, versions as _versions  # noqa: E402
from bench_memory import _reset_rss_peak, _rss_peak_bytes, parse_shapes, sync, train_steps  # noqa: E402

import torch  # noqa: E402

from qlora_ga.synthetic import ModelFactory, random_batch, random_sequences  # noqa: E402

IMPLS = ("qlora_ga", "qlora_ga_no_residual", "peft_qlora", "peft_qlora_no_prepare")
LAYOUTS = ("padded", "padding_free", "padding_free_dense", "packing", "peft_qlora_padded")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="checkpoint (hub id, folder, .gguf); default: a random Llama (--tiny: 4 layers)")
    p.add_argument("--tiny", action="store_true", help="4-layer hidden-256 random Llama (CPU smoke run)")
    p.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: cuda if available)")
    p.add_argument("--shape", default="4x256", help="training micro-batch BxT")
    p.add_argument("--rounds", type=int, default=8, help="timed rounds (one step of each implementation per round)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps of each implementation first")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument("--optim", default="paged_adamw_32bit", help="optimizer (qlora_ga.train.build_optimizer)")
    p.add_argument("--out", default="docs/benchmarks/step.jsonl", help="JSONL file the rows are appended to")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--compile", action="store_true", help="add qlora_ga_compiled: the qlora_ga step with every decoder block "
                   "torch.compile'd (qlora_ga.compile; the same model, toggled per step), its compile time and its "
                   "difference from the eager step reported apart")
    p.add_argument("--fused", action="store_true", help="add qlora_ga_fused: the qlora_ga step with --fused-lora (qlora_ga.fused; "
                   "the same model, toggled per step), and with --compile also qlora_ga_fused_compiled")
    p.add_argument("--liger", action="store_true", help="CUDA only: add qlora_ga_liger, a second qlora-ga model with Liger "
                   "Kernel's kernels (its module-level RoPE swapped in for that row's steps only)")
    p.add_argument("--profile", action="store_true", help="after the rounds: torch.profiler tables (top 15 ops by self device "
                   "time and by count) of one qlora_ga training step and of the gradient pass over the step's batch")
    p.add_argument("--data", default=None, help="a dataset file (e.g. GSM8K's train.jsonl): compare padded / padding-free / "
                                               "packed micro-batches of its sequences instead (see above)")
    args = p.parse_args(argv)
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error(f"--device {args.device}: no CUDA GPU is available (use --device cpu)")
    if args.rounds < 1 or args.warmup < 0:
        p.error("--rounds must be >= 1 and --warmup >= 0")
    if args.liger:
        from qlora_ga.errors import QloraGaError
        from qlora_ga.kernels import check_liger

        try:
            check_liger(args.device)
        except QloraGaError as e:
            p.error(str(e))
    (args.shape,) = parse_shapes(args.shape)
    return args


def build(factory: ModelFactory, args, device):
    """``{impl: (model, optimizer, set-up before its step)}`` for the four implementations."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    from qlora_ga.fused import fuse_lora, unfuse_lora
    from qlora_ga.estimate import estimate_factors
    from qlora_ga.init import init_adapters, lora_layers, singular_vectors_needed
    from qlora_ga.arch import resolve_targets
    from qlora_ga.residual import attach_residual, detach_residual, has_residual
    from qlora_ga.train import TrainSettings, build_optimizer
    from qlora_ga.train import checkpointing

    def optimizer(model, lr):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return build_optimizer(model, TrainSettings(optim=args.optim, lr=lr), device)

    model = factory.quantized()
    # adapters from a small sample: the step's speed does not depend on their values
    factors = estimate_factors(model, random_sequences(2, 64, factory.vocab_size, args.seed), rank=args.rank,
                               n_vectors=singular_vectors_needed("lora-ga", args.rank), progress=False)
    ours = init_adapters(model, factors, method="lora-ga", rank=args.rank, alpha=args.alpha)
    residuals = [(layer, layer.qlora_ga_A0, layer.qlora_ga_B0) for layer in lora_layers(ours).values() if has_residual(layer)]

    def with_residual(on: bool, fused: bool = False):
        def setup():
            for layer, a0, b0 in residuals:
                if on and not has_residual(layer):
                    attach_residual(layer, a0, b0, dtype=a0.dtype)
                elif not on and has_residual(layer):
                    detach_residual(layer)
            (fuse_lora if fused else unfuse_lora)(ours)
        return setup

    opt = optimizer(ours, 5e-5)
    out = {"qlora_ga": (ours, opt, with_residual(True)), "qlora_ga_no_residual": (ours, opt, with_residual(False))}
    if args.fused:
        out["qlora_ga_fused"] = (ours, opt, with_residual(True, fused=True))
    if args.liger and args.data is None:
        out["qlora_ga_liger"] = liger_model(factory, args, device, optimizer)
    for impl, prepare in (("peft_qlora", True), ("peft_qlora_no_prepare", False)):
        m = factory.quantized()
        if prepare:
            m = prepare_model_for_kbit_training(m, use_gradient_checkpointing=True,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
        pm = get_peft_model(m, LoraConfig(r=args.rank, lora_alpha=args.alpha, lora_dropout=0.0,
                                          target_modules=list(resolve_targets(m)), bias="none", task_type="CAUSAL_LM"))
        out[impl] = (pm, optimizer(pm, 1e-4), lambda: None)
    for pm, _, _ in out.values():
        checkpointing(pm, True)
        pm.train()
    return out


def liger_model(factory, args, device, optimizer):
    """``(model, optimizer, set-up)``: a qlora-ga model with Liger Kernel's kernels (``qlora_ga.kernels``). Liger
    patches the instance, and RoPE in the transformers module of the family (for every model in the process): the
    set-up swaps Liger's module-level functions in for this row's steps, and the row after it swaps them out."""
    import importlib

    from qlora_ga.estimate import estimate_factors
    from qlora_ga.init import init_adapters, singular_vectors_needed
    from qlora_ga.kernels import apply_liger

    model = factory.quantized()
    module = importlib.import_module(type(model).__module__)  # e.g. transformers.models.llama.modeling_llama
    before = dict(vars(module))
    apply_liger(model, device)
    patched = {k: v for k, v in vars(module).items() if before.get(k) is not v}
    original = {k: before[k] for k in patched if k in before}
    for k, v in original.items():  # the other rows run transformers' own functions
        setattr(module, k, v)
    factors = estimate_factors(model, random_sequences(2, 64, factory.vocab_size, args.seed), rank=args.rank,
                               n_vectors=singular_vectors_needed("lora-ga", args.rank), progress=False)
    pm = init_adapters(model, factors, method="lora-ga", rank=args.rank, alpha=args.alpha)

    def setup():
        for k, v in patched.items():
            setattr(module, k, v)

    def teardown():
        for k, v in original.items():
            setattr(module, k, v)

    LIGER_TEARDOWN.append(teardown)
    return pm, optimizer(pm, 5e-5), setup


LIGER_TEARDOWN: list = []  # run before every other row's set-up (undoes the module-level patches of the liger row)


def layout_batches(args, tok, rounds: int) -> dict[str, list[dict]]:
    """Per layout, one step per round (``qlora_ga.train.step_item`` of one collated micro-batch): padded,
    padding-free and PEFT's take the same sequences."""
    from dataclasses import replace

    from qlora_ga.config import FinetuneConfig
    from qlora_ga.data.build import build_data
    from qlora_ga.train import StepBatches, TrainSettings, step_item

    b, t = args.shape
    data = build_data(tok, FinetuneConfig(dataset=args.data, max_length=t, seed=args.seed).data_config())
    s = TrainSettings(batch_size=b, grad_accum=1, seed=args.seed, max_length=t)
    padded = StepBatches(data.train, s, tok.pad_token_id)
    flat = StepBatches(data.train, s, tok.pad_token_id, flat=True)
    packed = StepBatches(data.train, replace(s, packing=True), tok.pad_token_id)
    out = {"padded": [], "padding_free": [], "padding_free_dense": [], "packing": [], "useful": {}}
    for r in range(rounds):
        for name, sb in (("padded", padded), ("padding_free", flat), ("packing", packed)):
            item = sb[r]
            out[name].append(step_item([item["micro_batches"][0]]))
            out["useful"].setdefault(name, []).append(item["input_tokens"])
    out["peft_qlora_padded"], out["padding_free_dense"] = out["padded"], out["padding_free"]
    out["useful"]["peft_qlora_padded"] = out["useful"]["padded"]
    out["useful"]["padding_free_dense"] = out["useful"]["padding_free"]
    return out


def main_layouts(args, factory, device, meta) -> int:
    """``--data``: padded / padding-free / packed / PEFT padded, round-robin (see the module docstring)."""
    from qlora_ga.data.packing import padding_free_support

    dtype = factory.compute_dtype
    impls = build(factory, args, device)
    ours, ours_opt, _ = impls["qlora_ga"]
    peft, peft_opt, _ = impls["peft_qlora"]
    ok, how = padding_free_support(ours)
    print(f"padding-free: {ok} ({how})", flush=True)
    if not ok:
        return 2
    if args.model is None:
        raise SystemExit("--data needs --model (the data is tokenized with its tokenizer)")
    tok = _tokenizer(args.model)
    batches = layout_batches(args, tok, args.rounds + args.warmup)
    runner = {"padded": (ours, ours_opt), "padding_free": (ours, ours_opt), "padding_free_dense": (ours, ours_opt),
              "packing": (ours, ours_opt), "peft_qlora_padded": (peft, peft_opt)}
    from qlora_ga.arch import unwrap

    packed_impl = unwrap(ours).config._attn_implementation
    layouts = LAYOUTS
    toggle = None
    if args.compile:  # padding_free_compiled: the same flattened batches, the blocks' parts compiled (qlora_ga.compile)
        from qlora_ga.compile import compile_blocks, compile_stats, compiled_switch, dynamo_settings

        layouts = LAYOUTS + ("padding_free_compiled",)
        report = compile_blocks(ours)
        toggle = compiled_switch(ours)
        dynamo_settings().__enter__()  # for the rest of the process
        toggle(False)
        runner["padding_free_compiled"] = (ours, ours_opt)
        batches["padding_free_compiled"] = batches["padding_free"]
        batches["useful"]["padding_free_compiled"] = batches["useful"]["padding_free"]

    def step(name, item):
        """One optimizer step of layout ``name`` on ``item``, as the training loop runs it (``train_steps``: a flattened
        batch goes in with ``use_cache=False``); ``padding_free_dense``: the same flattened batch through transformers'
        own SDPA with its row-long block-diagonal mask (what padding-free ran before ``qlora_ga.attention``)."""
        if name == "padding_free_compiled":
            toggle(True)
            try:
                return train_steps(*runner[name], item, device, dtype, 1)
            finally:
                toggle(False)
        if name != "padding_free_dense":
            return train_steps(*runner[name], item, device, dtype, 1)
        from qlora_ga.attention import set_attention

        set_attention(ours, "sdpa")
        try:
            train_steps(*runner[name], item, device, dtype, 1)
        finally:
            set_attention(ours, packed_impl)
    flops = {}
    for name in layouts:  # warm-up rounds (untimed); the first one also counts the step's floating-point operations
        if name == "padding_free_compiled":  # compiles (and once more, with dynamic shapes, on a second length)
            t0 = time.perf_counter()
            for r in range(min(2, len(batches[name]))):
                step(name, batches[name][r])
            meta["compile"] = {**compile_stats(report).as_dict(), "warmup_s": round(time.perf_counter() - t0, 1)}
            flops[name] = flops["padding_free"]  # the same arithmetic (FlopCounterMode does not see compiled code)
            continue
        for r in range(args.warmup):
            with _flop_counter() if r == 0 else contextlib.nullcontext() as fc:
                step(name, batches[name][r])
            if r == 0:
                flops[name] = fc.get_total_flops() / batches["useful"][name][r]
    tps, secs, peak = {n: [] for n in layouts}, {n: [] for n in layouts}, {n: [] for n in layouts}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "a", encoding="utf-8") as f:
        for r in range(args.rounds):
            k = args.warmup + r
            for name in layouts[r % len(layouts):] + layouts[: r % len(layouts)]:  # rotate who goes first
                item = batches[name][k]
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                    base = torch.cuda.memory_allocated(device)
                else:
                    base = _host_baseline()
                sync(device)
                t0 = time.perf_counter()
                step(name, item)
                sync(device)
                dt = time.perf_counter() - t0
                useful = batches["useful"][name][k]
                tps[name].append(useful / dt)
                secs[name].append(dt)
                row = {**meta, "part": "layout", "impl": name, "round": r, "seconds": round(dt, 4), "useful_tokens": useful,
                       "computed_tokens": _computed_tokens(item), "useful_tokens_per_s": round(useful / dt, 2)}
                if device.type == "cuda":
                    peak[name].append(torch.cuda.max_memory_allocated(device) - base)
                elif base is not None:
                    peak[name].append(_rss_peak_bytes() - base)
                if peak[name]:
                    row["peak_step_bytes"] = peak[name][-1]
                f.write(json.dumps(row) + "\n")
        med = {n: statistics.median(v) for n, v in tps.items()}
        # the same round's steps ran closest in time: per-round ratios to the padded step carry the least drift
        paired = {n: statistics.median(a / p for a, p in zip(tps[n], tps["padded"])) for n in layouts}
        useful = {n: sum(batches["useful"][n][args.warmup:]) for n in layouts}
        computed = {n: sum(_computed_tokens(item) for item in batches[n][args.warmup:]) for n in layouts}
        ratios = {f"{n}_over_padded": med[n] / med["padded"] for n in layouts} | \
                 {f"{n}_over_peft_padded": med[n] / med["peft_qlora_padded"] for n in layouts}
        f.write(json.dumps({**meta, "part": "layout_summary", "median_useful_tokens_per_s": {k: round(v, 2) for k, v in med.items()},
                            "padding_fraction": {n: round(1 - useful[n] / computed[n], 4) for n in layouts},
                            "median_paired_over_padded": {n: round(v, 4) for n, v in paired.items()},
                            "flops_per_useful_token": {n: round(v) for n, v in flops.items()},
                            **({"median_peak_step_bytes": {n: int(statistics.median(v)) for n, v in peak.items()},
                                "max_peak_step_bytes": {n: int(max(v)) for n, v in peak.items()},
                                "peak_measure": "cuda max_memory_allocated" if device.type == "cuda" else "host VmHWM - VmRSS"}
                               if peak["padded"] else {}),
                            **{k: round(v, 4) for k, v in ratios.items()}}) + "\n")
    print(f"\n{'layout':<20} {'useful tok/s':>12} {'min':>8} {'max':>8} {'padding':>8} {'vs padded':>10} {'paired':>8} "
          f"{'vs PEFT':>8} {'GFLOP/useful tok':>17}")
    for n in layouts:
        print(f"{n:<20} {med[n]:>12.1f} {min(tps[n]):>8.1f} {max(tps[n]):>8.1f} {1 - useful[n] / computed[n]:>8.1%} "
              f"{ratios[n + '_over_padded']:>9.3f}x {paired[n]:>7.3f}x {ratios[n + '_over_peft_padded']:>7.3f}x "
              f"{flops[n] / 1e9:>17.3f}")
    if "compile" in meta:
        c = meta["compile"]
        print(f"padding_free_compiled: {c['parts']}, {c['graphs']} graph(s) compiled in {c['compile_s']} s "
              f"(its two warm-up steps {c['warmup_s']} s), {c['graph_breaks']} graph break(s)")
    if peak["padded"]:
        where = "GPU" if device.type == "cuda" else "host RSS"
        print(f"peak {where} memory of a step above what was resident before it (MiB, median / max): "
              + ", ".join(f"{n} {statistics.median(v) / 2**20:.0f} / {max(v) / 2**20:.0f}" for n, v in peak.items()))
    return 0


def _computed_tokens(item: dict) -> int:
    """Positions the model computes for a step (padding included)."""
    return sum(int(b["input_ids"].numel()) for b in item["micro_batches"])


def _flop_counter():
    """``torch.utils.flop_counter.FlopCounterMode`` that also counts the CPU flash-attention kernels (full T x T
    per row whatever the mask, as those kernels compute it); the bitsandbytes dequantization is not counted."""
    from torch.utils import flop_counter as fcm

    ops = torch.ops.aten
    if ops._scaled_dot_product_flash_attention_for_cpu not in fcm.flop_registry:
        @fcm.register_flop_formula(ops._scaled_dot_product_flash_attention_for_cpu)
        def _fwd(query, key, value, *args, out_val=None, **kwargs):
            return fcm.sdpa_flop_count(query, key, value)  # shapes (the registry passes shapes)

        @fcm.register_flop_formula(ops._scaled_dot_product_flash_attention_for_cpu_backward)
        def _bwd(grad_out, query, key, value, *args, out_val=None, **kwargs):
            return fcm.sdpa_backward_flop_count(grad_out, query, key, value)
    return fcm.FlopCounterMode(display=False)


def _host_baseline() -> int | None:
    """CPU: free what can be freed, reset the process's peak RSS (VmHWM) and return the RSS now; None where
    Linux does not let the peak be reset (then no per-step peak is reported)."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed heap pages back, so the RSS now is what is in use
    except OSError:
        pass
    if not _reset_rss_peak():
        return None
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


def _tokenizer(model: str):
    """The tokenizer of ``--model`` (a .gguf: its cached conversion, as ``load_model`` makes it)."""
    from qlora_ga.model import load_tokenizer, resolve_model_source

    return load_tokenizer(resolve_model_source(model))


def main(argv=None) -> int:
    quiet()
    args = parse_args(argv)
    from qlora_ga.model import as_device
    from qlora_ga.train import step_item

    device = as_device(args.device)
    torch.manual_seed(args.seed)
    factory = ModelFactory(device, model=args.model, tiny=args.tiny, seed=args.seed)
    if args.data is not None:
        b, t = args.shape
        meta = {"bench": "step_layout", "model": factory.label, "data": Path(args.data).name, "device": device_name(device),
                "device_type": device.type, "shape": f"{b}x{t}", "rank": args.rank, "optim": args.optim,
                **{f"{k}_version": v for k, v in _versions().items()},
                "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                "command": shlex.join([os.path.basename(sys.executable)] + sys.argv if argv is None else ["bench_step.py", *argv]),
                "run_id": f"{int(time.time())}-{os.getpid()}", "threads": torch.get_num_threads()}
        print(f"bench_step (layouts): {factory.label} on {meta['device']}, {b}x{t}, {args.rounds} rounds", flush=True)
        return main_layouts(args, factory, device, meta)
    dtype = factory.compute_dtype
    impls = build(factory, args, device)
    b, t = args.shape
    item = step_item([random_batch(b, t, factory.vocab_size, args.seed + 1, device)])  # the training loop's form
    meta = {"bench": "step", "model": factory.label, "device": device_name(device), "device_type": device.type,
            "shape": f"{b}x{t}", "rank": args.rank, "optim": args.optim, "rounds": args.rounds, "warmup": args.warmup,
            **{f"{k}_version": v for k, v in _versions().items()},
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "command": shlex.join([os.path.basename(sys.executable)] + sys.argv if argv is None else ["bench_step.py", *argv]),
            "run_id": f"{int(time.time())}-{os.getpid()}", "threads": torch.get_num_threads()}
    print(f"bench_step: {factory.label} on {meta['device']}, {b}x{t}, {args.rounds} rounds", flush=True)
    names = IMPLS + (("qlora_ga_compiled",) if args.compile else ()) + (("qlora_ga_fused",) if args.fused else ()) \
        + (("qlora_ga_fused_compiled",) if args.fused and args.compile else ()) + (("qlora_ga_liger",) if args.liger else ())
    if args.fused:
        meta["fused"] = fused_difference(impls, item, device, dtype)
    if args.compile:
        meta["compile"] = add_compiled(impls, item, device, dtype, fused=args.fused)
    for name, (model, opt, setup) in list(impls.items()):
        if name != "qlora_ga_liger":
            impls[name] = (model, opt, _after_liger(setup))
    for name in names:
        model, opt, setup = impls[name]
        setup()
        train_steps(model, opt, item, device, dtype, args.warmup)
    tps = {name: [] for name in names}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "a", encoding="utf-8") as f:
        for r in range(args.rounds):
            for name in names[r % len(names):] + names[: r % len(names)]:  # rotate who goes first
                model, opt, setup = impls[name]
                setup()
                sync(device)
                t0 = time.perf_counter()
                train_steps(model, opt, item, device, dtype, 1)
                sync(device)
                tps[name].append(b * t / (time.perf_counter() - t0))
                f.write(json.dumps({**meta, "part": "step", "impl": name, "round": r, "tokens_per_s": round(tps[name][-1], 2)}) + "\n")
        med = {name: statistics.median(v) for name, v in tps.items()}
        quartiles = {name: [round(q, 2) for q in statistics.quantiles(v, n=4)] if len(v) > 1 else [round(v[0], 2)] * 3
                     for name, v in tps.items()}
        ratios = {"residual_overhead": med["qlora_ga_no_residual"] / med["qlora_ga"] - 1,
                  "ours_over_peft": med["qlora_ga"] / med["peft_qlora"],
                  "ours_over_peft_no_prepare": med["qlora_ga"] / med["peft_qlora_no_prepare"]}
        for name in names[len(IMPLS):]:  # qlora_ga_compiled -> compiled_over_*, qlora_ga_fused -> fused_over_*, ...
            key = name.removeprefix("qlora_ga_")
            ratios.update({f"{key}_over_eager": med[name] / med["qlora_ga"],
                           f"{key}_over_eager_paired": statistics.median(c / e for c, e in zip(tps[name], tps["qlora_ga"])),
                           f"{key}_over_peft": med[name] / med["peft_qlora"],
                           f"{key}_over_peft_no_prepare": med[name] / med["peft_qlora_no_prepare"]})
        profile = profile_tables(impls, item, device, dtype, factory) if args.profile else None
        f.write(json.dumps({**meta, "part": "summary", "median_tokens_per_s": {k: round(v, 2) for k, v in med.items()},
                            "quartiles_tokens_per_s": quartiles, **{k: round(v, 4) for k, v in ratios.items()},
                            **({"profile": profile} if profile else {})}) + "\n")
    print(f"\n{'implementation':<24} {'median tok/s':>12} {'p25':>8} {'p75':>8} {'min':>8} {'max':>8} {'vs eager':>9} "
          f"{'vs PEFT':>8} {'vs PEFT (no prepare)':>21}")
    for name in names:
        print(f"{name:<24} {med[name]:>12.1f} {quartiles[name][0]:>8.1f} {quartiles[name][2]:>8.1f} {min(tps[name]):>8.1f} "
              f"{max(tps[name]):>8.1f} {med[name] / med['qlora_ga']:>8.3f}x {med[name] / med['peft_qlora']:>7.3f}x "
              f"{med[name] / med['peft_qlora_no_prepare']:>20.3f}x")
    print(f"\nresidual overhead {100 * ratios['residual_overhead']:+.2f}% (target < 3%); ours / PEFT "
          f"{ratios['ours_over_peft']:.3f}x (prepare_model_for_kbit_training), {ratios['ours_over_peft_no_prepare']:.3f}x "
          f"(no prepare) (target >= 1.0x)")
    for name in names[len(IMPLS):]:
        key = name.removeprefix("qlora_ga_")
        print(f"{key} / eager {ratios[key + '_over_eager']:.3f}x (per-round pairs {ratios[key + '_over_eager_paired']:.3f}x), "
              f"{key} / PEFT {ratios[key + '_over_peft']:.3f}x")
    if args.compile:
        c = meta["compile"]
        print(f"compile: {c['graphs']} graph(s) compiled in {c['compile_s']} s (first step {c['first_step_s']} s), "
              f"{c['graph_breaks']} graph break(s); loss and gradients against eager: "
              f"{c['loss_rel_diff']:.2g} / {c['grad_rel_diff']:.2g} relative")
    if args.fused:
        fd = meta["fused"]
        print(f"fused: {fd['layers']} LoRA linears; loss and gradients against PEFT's forward: "
              f"{fd['loss_rel_diff']:.2g} / {fd['grad_rel_diff']:.2g} relative")
    if profile:
        for title, table in profile.items():
            print(f"\n{title}\n{table}")
    return 0


def _loss_and_grads(model, item, device, dtype):
    """The loss of ``item`` and the trainable parameters' gradients (flattened, fp32) from the training loop's
    ``accumulate_gradients``; the gradients are cleared before and after."""
    from qlora_ga.train import accumulate_gradients, trainable_parameters

    params = trainable_parameters(model)
    model.zero_grad(set_to_none=True)
    loss = accumulate_gradients(model, item, device, dtype)
    grads = torch.cat([p.grad.flatten().float() for p in params])
    model.zero_grad(set_to_none=True)
    return float(loss), grads


def _rel(a, b) -> float:
    return float((a - b).abs().max() / b.abs().max()) if isinstance(a, torch.Tensor) else abs(a - b) / abs(b)


def fused_difference(impls: dict, item: dict, device, dtype) -> dict:
    """The fused step's loss and gradients against PEFT's forward, from the same weights (before any timed step)."""
    from qlora_ga.fused import _lora_4bit_layers

    model, _, eager = impls["qlora_ga"]
    _, _, fused = impls["qlora_ga_fused"]
    eager()
    loss_e, grad_e = _loss_and_grads(model, item, device, dtype)
    fused()
    loss_f, grad_f = _loss_and_grads(model, item, device, dtype)
    eager()
    return {"layers": len(_lora_4bit_layers(model)), "loss_rel_diff": _rel(loss_f, loss_e), "grad_rel_diff": _rel(grad_f, grad_e)}


def _after_liger(setup):
    """``setup`` preceded by undoing the liger row's module-level patches (see :func:`liger_model`)."""
    def run():
        for undo in LIGER_TEARDOWN:
            undo()
        setup()
    return run


def add_compiled(impls: dict, item: dict, device, dtype, fused: bool = False) -> dict:
    """``impls["qlora_ga_compiled"]`` (and with ``fused``, ``qlora_ga_fused_compiled``): the qlora_ga model with its
    decoder blocks compiled (qlora_ga.compile), toggled per step (``qlora_ga`` runs them eager). First, on ``item``:
    one eager and one compiled forward + backward from the same weights (the loss's and the gradients' relative
    differences), and the compile time."""
    from qlora_ga.compile import compile_blocks, compile_stats, compiled_switch, dynamo_settings

    model, opt, setup = impls["qlora_ga"]
    report = compile_blocks(model)
    switch = compiled_switch(model)

    def toggle(on: bool, base=setup):
        def set_up():
            base()
            switch(on)
        return set_up

    toggle(False)()
    loss_e, grad_e = _loss_and_grads(model, item, device, dtype)
    toggle(True)()
    sync(device)
    t0 = time.perf_counter()
    dynamo_settings().__enter__()  # for the rest of the process (recompiles in the timed rounds too)
    loss_c, grad_c = _loss_and_grads(model, item, device, dtype)  # compiles here
    sync(device)
    first = time.perf_counter() - t0
    compile_stats(report)
    impls["qlora_ga"] = (model, opt, toggle(False))
    impls["qlora_ga_compiled"] = (model, opt, toggle(True))
    if fused:
        impls["qlora_ga_fused_compiled"] = (model, opt, toggle(True, impls["qlora_ga_fused"][2]))
        impls["qlora_ga_fused"] = (model, opt, toggle(False, impls["qlora_ga_fused"][2]))
    return {**report.as_dict(), "first_step_s": round(first, 2), "loss_rel_diff": _rel(loss_c, loss_e),
            "grad_rel_diff": _rel(grad_c, grad_e)}


def profile_tables(impls: dict, item: dict, device, dtype, factory) -> dict:
    """``{title: table}``: torch.profiler's top 15 ops by self device time (CPU time on a CPU) and by call count, for
    one qlora_ga training step (eager) and for the gradient pass over the step's batch (a fresh 4-bit model; its
    totals over all decoder blocks, which run the same ops)."""
    from torch.profiler import ProfilerActivity, profile

    from qlora_ga.estimate import estimate_factors
    from qlora_ga.init import singular_vectors_needed
    from qlora_ga.arch import find_decoder_layers, unwrap

    model, opt, setup = impls["qlora_ga"]
    setup()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    out = {}
    with profile(activities=activities) as prof:
        train_steps(model, opt, item, device, dtype, 1)
        sync(device)
    out["one training step (qlora_ga eager), by self time"] = prof.key_averages().table(sort_by=key, row_limit=15)
    out["one training step (qlora_ga eager), by count"] = prof.key_averages().table(sort_by="count", row_limit=15)
    base = factory.quantized()
    blocks = len(find_decoder_layers(unwrap(base))[1])
    batch = item["micro_batches"][0]
    b, t = batch["input_ids"].shape
    examples = [{"input_ids": ids, "labels": ids} for ids in batch["input_ids"].tolist()]
    with profile(activities=activities) as prof:
        estimate_factors(base, examples, rank=8, n_vectors=singular_vectors_needed("lora-ga", 8), micro_batch_size=b,
                         progress=False)
        sync(device)
    title = f"gradient pass over {b}x{t} tokens (totals over its {blocks} decoder blocks: / {blocks} for one)"
    out[title + ", by self time"] = prof.key_averages().table(sort_by=key, row_limit=15)
    out[title + ", by count"] = prof.key_averages().table(sort_by="count", row_limit=15)
    del base
    return out


if __name__ == "__main__":
    sys.exit(main())
