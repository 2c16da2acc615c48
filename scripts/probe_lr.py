#!/usr/bin/env python
"""The exploration behind --lr auto (docs/RESULTS.md section 8.1): per init, two candidate predictors of
the best AdamW lr on section 5's setting (SmolLM2-135M 4-bit, GSM8K, seed 0's first training batches):

- the loss along Adam's first step, ``L(theta - eta * g / (|g| + 1e-8))``, at 17 etas a quarter-decade
  apart (1e-5 .. 1e-1), and along the normalised gradient (SGD) for comparison;
- the largest Hessian eigenvalue over the adapters (power iteration, finite-difference Hessian-vector
  products on batch 0; skipped with NOPOWER=1).

    OMP_NUM_THREADS=1 python scripts/probe_lr.py gaussian,lora-one [SEED] [OUT.jsonl]

One JSON line per method is appended to OUT (default docs/benchmarks/lr-probe.jsonl). Slow (minutes
per method on a CPU); an exploration script, not part of the tool.
"""
import sys, time, json, math, os
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parents[1])); sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch
import bench_convergence as bc
from bench_common import quiet

def main():
    quiet()
    methods = sys.argv[1].split(",")
    seed = int(sys.argv[2]) if len(sys.argv) > 2 else 0
    args = bc.parse_args(["--data-dir", "../shared/data/gsm8k", "--steps", "50", "--batch-size", "8", "--max-length", "256",
                          "--eval-examples", "64", "--max-train-examples", "2000", "--init-samples", "64", "--methods", ",".join(methods), "--seeds", str(seed)])
    from qlora_ga.data import DataConfig, build_data, collate
    from qlora_ga.model import default_device, load_tokenizer, resolve_model_source, load_model
    from qlora_ga.methods import GRADIENT_METHODS, method_defaults
    from qlora_ga.data import sample_batch
    from qlora_ga.estimate import estimate_factors
    from qlora_ga import init as init_mod
    from qlora_ga.init import init_adapters, singular_vectors_needed
    from qlora_ga.train import TrainSettings, StepBatches, trainable_parameters
    device = torch.device("cpu")
    source = resolve_model_source(None); tok = load_tokenizer(source)
    data = build_data(tok, DataConfig(dataset="../shared/data/gsm8k/train.jsonl", eval_split="test", max_length=256, max_examples=2000, seed=0))
    s = TrainSettings(batch_size=8, grad_accum=1, lr=1e-3, max_steps=50, seed=seed)
    sb = StepBatches(data.train, s, tok.pad_token_id)
    batches = [sb[k]["micro_batches"][0] for k in ((0,) if os.environ.get("NOPOWER") else (0, 1))]
    for method in methods:
        d = method_defaults(method)
        torch.manual_seed(seed)
        model, _ = load_model(source, device=device)
        factors = None
        t0 = time.perf_counter()
        if method in GRADIENT_METHODS:
            sample = sample_batch(data.train, 64, seed)
            factors = estimate_factors(model, sample, rank=8, n_vectors=singular_vectors_needed(method, 8),
                                       reducer=init_mod.factor_reducer(method, 8, d["gamma"]), micro_batch_size=8,
                                       pad_token_id=tok.pad_token_id, progress=False)
        torch.manual_seed(seed)
        pm = init_adapters(model, factors, method=method, rank=8, alpha=d["alpha"], gamma=d["gamma"], use_rslora=d["use_rslora"])
        print(method, "init", round(time.perf_counter() - t0, 1), "s", flush=True)
        pm.eval()
        params = trainable_parameters(pm)
        theta0 = [p.detach().clone() for p in params]
        def loss_on(b):
            return pm(**b).loss
        def grad_on(b):
            for p in params: p.grad = None
            l = loss_on(b); l.backward()
            return l.item(), [p.grad.detach().clone() for p in params]
        def setp(delta, scale):
            with torch.no_grad():
                for p, t, dd in zip(params, theta0, delta): p.copy_(t + scale * dd)
        res = {"method": method, "seed": seed}
        for bi, b in enumerate(batches):
            t1 = time.perf_counter()
            L0, g = grad_on(b)
            gn = math.sqrt(sum(float((x.double() ** 2).sum()) for x in g))
            u = [x / (x.abs() + 1e-8) for x in g]
            etas = [10 ** e for e in torch.linspace(-5, -1, 17).tolist()]
            Ls = []
            with torch.no_grad():
                for eta in etas:
                    setp(u, -eta); Ls.append(loss_on(b).item())
                setp(u, 0.0)
            k = min(range(len(Ls)), key=Ls.__getitem__)
            # sgd direction line search
            gd = [x / gn for x in g]
            Lg = []
            with torch.no_grad():
                for eta in [10 ** e for e in torch.linspace(-3, 1, 17).tolist()]:
                    setp(gd, -eta); Lg.append(loss_on(b).item())
                setp(gd, 0.0)
            kg = min(range(len(Lg)), key=Lg.__getitem__)
            res[f"b{bi}"] = dict(L0=L0, gnorm=gn, eta_star=etas[k], L_star=Ls[k], Ls=[round(x, 4) for x in Ls],
                                 sgd_eta_star=10 ** torch.linspace(-3, 1, 17).tolist()[kg], sgd_Ls=[round(x, 4) for x in Lg],
                                 ls_s=round(time.perf_counter() - t1, 1))
            print(json.dumps({method: res[f"b{bi}"]}), flush=True)
        if os.environ.get("NOPOWER"):
            print("RESULT", json.dumps(res), flush=True)
            continue
        # power iteration, FD HVP on batch 0
        t1 = time.perf_counter()
        b = batches[0]
        setp(u, 0.0)
        L0, g0 = grad_on(b)
        v = [torch.randn_like(x) for x in g0]
        lam = None
        for it in range(8):
            vn = math.sqrt(sum(float((x.double() ** 2).sum()) for x in v)); v = [x / vn for x in v]
            eps = 1e-3 * math.sqrt(sum(float((x.double() ** 2).sum()) for x in theta0)) / 1 if False else 1e-3
            setp(v, eps); _, g1 = grad_on(b); setp(v, 0.0)
            hv = [(a - c) / eps for a, c in zip(g1, g0)]
            lam = sum(float((x.double() * y.double()).sum()) for x, y in zip(hv, v))
            v = hv
            print(method, "power it", it, "lambda", lam, flush=True)
        res["lambda_max"] = lam; res["power_s"] = round(time.perf_counter() - t1, 1)
        print("RESULT", json.dumps(res), flush=True)
        with open(sys.argv[3] if len(sys.argv) > 3 else "docs/benchmarks/lr-probe.jsonl", "a") as f:
            f.write(json.dumps(res) + "\n")
        del pm, model

main()
