#!/usr/bin/env python
"""Training-step speed, interleaved: qlora-ga with its residual, without it, and PEFT's QLoRA with and
without ``prepare_model_for_kbit_training``, timed round-robin in one process.

    python scripts/bench_step.py --model SmolLM2.gguf --device cpu --shape 4x256 --rounds 8

``bench_memory.py`` measures each implementation in its own phase, one after the other; on a shared
machine whose load drifts, the ratios then carry that drift. Here the models are built once, side by
side, and each round times one optimizer step of each (the same step function as ``bench_memory``:
autocast on CUDA, gradient checkpointing, grad-norm clipping, the optimizer), in a rotating order.
The median over rounds is reported per implementation, with the ratios; one JSON row per step and
one summary row are appended to ``--out``. The residual on/off rows share one model (the residual is
detached and re-attached between them), so they differ only in the residual.
"""

from __future__ import annotations

import argparse
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
from bench_memory import ModelFactory, parse_shapes, random_batch, random_examples, sync, train_steps  # noqa: E402

import torch  # noqa: E402

IMPLS = ("qlora_ga", "qlora_ga_no_residual", "peft_qlora", "peft_qlora_no_prepare")


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
    args = p.parse_args(argv)
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error(f"--device {args.device}: no CUDA GPU is available (use --device cpu)")
    if args.rounds < 1 or args.warmup < 0:
        p.error("--rounds must be >= 1 and --warmup >= 0")
    # the factory's knobs that this script does not expose
    args.materialize, args.workdir, args.init_shapes, args.train_shapes = "direct", "./.bench", [], []
    (args.shape,) = parse_shapes(args.shape)
    return args


def build(factory: ModelFactory, args, device):
    """``{impl: (model, optimizer, set-up before its step)}`` for the four implementations."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    from qlora_ga.gradient import estimate_factors
    from qlora_ga.init import init_adapters, lora_layers, singular_vectors_needed
    from qlora_ga.model import resolve_targets
    from qlora_ga.residual import attach_residual, detach_residual, has_residual
    from qlora_ga.train import TrainSettings, _checkpointing, build_optimizer

    def optimizer(model, lr):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return build_optimizer(model, TrainSettings(optim=args.optim, lr=lr), device)

    model = factory.quantized()
    # adapters from a small sample: the step's speed does not depend on their values
    factors = estimate_factors(model, random_examples(2, 64, factory.vocab_size, args.seed), rank=args.rank,
                               n_vectors=singular_vectors_needed("lora-ga", args.rank), progress=False)
    ours = init_adapters(model, factors, method="lora-ga", rank=args.rank, alpha=args.alpha)
    residuals = [(layer, layer.qlora_ga_A0, layer.qlora_ga_B0) for layer in lora_layers(ours).values() if has_residual(layer)]

    def with_residual(on: bool):
        def setup():
            for layer, a0, b0 in residuals:
                if on and not has_residual(layer):
                    attach_residual(layer, a0, b0, dtype=a0.dtype)
                elif not on and has_residual(layer):
                    detach_residual(layer)
        return setup

    opt = optimizer(ours, 5e-5)
    out = {"qlora_ga": (ours, opt, with_residual(True)), "qlora_ga_no_residual": (ours, opt, with_residual(False))}
    for impl, prepare in (("peft_qlora", True), ("peft_qlora_no_prepare", False)):
        m = factory.quantized()
        if prepare:
            m = prepare_model_for_kbit_training(m, use_gradient_checkpointing=True,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
        pm = get_peft_model(m, LoraConfig(r=args.rank, lora_alpha=args.alpha, lora_dropout=0.0,
                                          target_modules=list(resolve_targets(m)), bias="none", task_type="CAUSAL_LM"))
        out[impl] = (pm, optimizer(pm, 1e-4), lambda: None)
    for pm, _, _ in out.values():
        _checkpointing(pm, True)
        pm.train()
    return out


def main(argv=None) -> int:
    quiet()
    args = parse_args(argv)
    from qlora_ga.model import as_device

    device = as_device(args.device)
    torch.manual_seed(args.seed)
    factory = ModelFactory(args, device)
    dtype = factory.compute_dtype
    impls = build(factory, args, device)
    b, t = args.shape
    batch = random_batch(b, t, factory.vocab_size, args.seed + 1, device)
    meta = {"bench": "step", "model": factory.label, "device": device_name(device), "device_type": device.type,
            "shape": f"{b}x{t}", "rank": args.rank, "optim": args.optim,
            **{f"{k}_version": v for k, v in _versions().items()},
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "command": shlex.join([os.path.basename(sys.executable)] + sys.argv if argv is None else ["bench_step.py", *argv]),
            "run_id": f"{int(time.time())}-{os.getpid()}", "threads": torch.get_num_threads()}
    print(f"bench_step: {factory.label} on {meta['device']}, {b}x{t}, {args.rounds} rounds", flush=True)
    for name in IMPLS:
        model, opt, setup = impls[name]
        setup()
        train_steps(model, opt, batch, device, dtype, args.warmup)
    tps = {name: [] for name in IMPLS}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "a", encoding="utf-8") as f:
        for r in range(args.rounds):
            for name in IMPLS[r % len(IMPLS):] + IMPLS[: r % len(IMPLS)]:  # rotate who goes first
                model, opt, setup = impls[name]
                setup()
                sync(device)
                t0 = time.perf_counter()
                train_steps(model, opt, batch, device, dtype, 1)
                sync(device)
                tps[name].append(b * t / (time.perf_counter() - t0))
                f.write(json.dumps({**meta, "part": "step", "impl": name, "round": r, "tokens_per_s": round(tps[name][-1], 2)}) + "\n")
        med = {name: statistics.median(v) for name, v in tps.items()}
        ratios = {"residual_overhead": med["qlora_ga_no_residual"] / med["qlora_ga"] - 1,
                  "ours_over_peft": med["qlora_ga"] / med["peft_qlora"],
                  "ours_over_peft_no_prepare": med["qlora_ga"] / med["peft_qlora_no_prepare"]}
        f.write(json.dumps({**meta, "part": "summary", "median_tokens_per_s": {k: round(v, 2) for k, v in med.items()},
                            **{k: round(v, 4) for k, v in ratios.items()}}) + "\n")
    print(f"\n{'implementation':<24} {'median tok/s':>12} {'min':>8} {'max':>8}")
    for name in IMPLS:
        print(f"{name:<24} {med[name]:>12.1f} {min(tps[name]):>8.1f} {max(tps[name]):>8.1f}")
    print(f"\nresidual overhead {100 * ratios['residual_overhead']:+.2f}% (target < 3%); ours / PEFT "
          f"{ratios['ours_over_peft']:.3f}x (prepare_model_for_kbit_training), {ratios['ours_over_peft_no_prepare']:.3f}x "
          f"(no prepare) (target >= 1.0x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
