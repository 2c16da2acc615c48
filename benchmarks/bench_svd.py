#!/usr/bin/env python
"""How accurate the init's randomized SVD is, and what it costs, per setting: principal angles against the exact SVD.

    python benchmarks/bench_svd.py --model SmolLM2.gguf --data gsm8k/train.jsonl --samples 32 --rank 8

The gradient pass runs once over ``--samples`` sequences (``--max-length`` tokens at most); each target linear's
exact G then goes through ``torch.linalg.svd`` (the reference) and through ``qlora_ga.estimate.truncated_svd``
(``torch.svd_lowrank`` with that q, seeded as the init seeds it) at every ``--niter`` x ``--oversample`` setting. LoRA-GA
starts A from V[:, :r] and B from U[:, r:2r] (``qlora_ga.init.lora_ga_factors``), so those two subspaces are
compared: the sine of the largest principal angle between the randomized and the exact one (0: the same
subspace; 1: a direction orthogonal to it), with the relative error of the 2r singular values and the time
per SVD. One JSON row per setting (medians and maxima over the modules) goes to ``--out``; the table is
printed. Without ``--data`` the sequences are generated arithmetic problems.
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
import zlib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_common import device_name, quiet, versions as _versions  # noqa: E402

import torch  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="checkpoint (hub id, folder, .gguf); default: the bundled SmolLM2-135M")
    p.add_argument("--data", default=None, help="dataset file (e.g. GSM8K's train.jsonl); default: generated arithmetic")
    p.add_argument("--samples", type=int, default=32, help="sequences in the gradient pass")
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--rank", type=int, default=8, help="LoRA rank r (the SVD keeps 2r triplets, as LoRA-GA's init)")
    p.add_argument("--niter", default="0,1,2,4", help="power iterations to try (the init's default: 4)")
    p.add_argument("--oversample", default="2.0,1.5", help="q / 2r ratios to try (the init's default: 2, q = 4r)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    p.add_argument("--out", default="docs/benchmarks/svd.jsonl")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args.niter = [int(x) for x in args.niter.split(",")]
    args.oversample = [float(x) for x in args.oversample.split(",")]
    if args.samples < 1 or args.rank < 1 or min(args.niter) < 0 or min(args.oversample) < 1:
        p.error("--samples and --rank must be >= 1, --niter >= 0, --oversample >= 1")
    return args


def sin_max_angle(A: torch.Tensor, B: torch.Tensor) -> float:
    """Sine of the largest principal angle between span(A) and span(B) (orthonormal columns, same count)."""
    s = torch.linalg.svdvals(A.T.double() @ B.double()).clamp(max=1.0)
    return float(torch.sqrt(1 - s.min() ** 2))


def lowrank(G: torch.Tensor, k: int, q: int, niter: int, seed: int):
    """The init's SVD (``qlora_ga.estimate.truncated_svd``, seeded as ``svd_reducer`` seeds it) with a given q."""
    from qlora_ga.estimate import truncated_svd

    with torch.random.fork_rng(devices=[G.device] if G.device.type == "cuda" else []):
        torch.manual_seed(seed)
        return truncated_svd(G, k, "lowrank", niter, q=q)


def examples(args, tok) -> list[dict]:
    """The first ``--samples`` tokenized sequences of ``--data`` (or of generated arithmetic problems)."""
    import tempfile

    from qlora_ga.config import FinetuneConfig
    from qlora_ga.data import build_data, make_arithmetic_examples

    with tempfile.TemporaryDirectory() as tmp:
        data = args.data
        if data is None:
            data = str(Path(tmp) / "arithmetic.jsonl")
            Path(data).write_text("".join(json.dumps(e) + "\n" for e in make_arithmetic_examples(4 * args.samples, seed=args.seed)))
        rows = build_data(tok, FinetuneConfig(dataset=data, max_length=args.max_length, seed=args.seed).data_config()).train
    return rows[: args.samples]


def main(argv=None) -> int:
    quiet()
    args = parse_args(argv)
    from qlora_ga.estimate import gradient_pass
    from qlora_ga.model import default_model_path, load_model

    model, tok = load_model(args.model or str(default_model_path()), device=args.device)
    r, k = args.rank, 2 * args.rank
    settings = [(n, o) for o in args.oversample for n in args.niter]
    stats = {s: {"sin_V": [], "sin_U2": [], "s_rel": [], "sec": []} for s in settings}
    exact_sec = []
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)

    def reduce(name: str, G: torch.Tensor):
        sync()
        t = time.perf_counter()
        U, S, Vh = torch.linalg.svd(G, full_matrices=False)
        sync()
        exact_sec.append(time.perf_counter() - t)
        U, S, V = U[:, :k], S[:k], Vh[:k].T
        for niter, over in settings:
            sync()
            t = time.perf_counter()
            u, s, v = lowrank(G, k, int(round(over * k)), niter, zlib.crc32(name.encode()))
            sync()
            st = stats[(niter, over)]
            st["sec"].append(time.perf_counter() - t)
            st["sin_V"].append(sin_max_angle(v[:, :r], V[:, :r]))  # A's start
            st["sin_U2"].append(sin_max_angle(u[:, r:k], U[:, r:k]))  # B's start
            st["s_rel"].append(float(((s - S).abs() / S.clamp(min=1e-30)).max()))
        return None

    rows = examples(args, tok)
    t0 = time.perf_counter()
    gradient_pass(model, rows, reduce, micro_batch_size=8, pad_token_id=tok.pad_token_id, progress=False)
    wall = time.perf_counter() - t0
    meta = {"bench": "svd", "model": Path(args.model or str(default_model_path())).name, "data": Path(args.data).name if args.data else "arithmetic",
            "device": device_name(torch.device(args.device)), "samples": len(rows), "rank": r, "modules": len(exact_sec),
            **{f"{k_}_version": v for k_, v in _versions().items()},
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "command": shlex.join([os.path.basename(sys.executable)] + sys.argv if argv is None else ["bench_svd.py", *argv])}
    print(f"bench_svd: {meta['model']} on {meta['device']}, {len(rows)} sequences, {len(exact_sec)} target linears, rank {r} "
          f"(2r = {k} triplets); the pass with every SVD below: {wall:.1f} s; exact SVD {statistics.mean(exact_sec) * 1e3:.1f} ms each")
    print(f"\n{'niter':>5} {'q':>4} {'sin angle V[:, :r] median / max':>32} {'sin angle U[:, r:2r] median / max':>34} "
          f"{'S rel. err max':>15} {'ms per SVD':>11}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "a", encoding="utf-8") as f:
        for (niter, over), st in stats.items():
            row = {**meta, "niter": niter, "q": int(round(over * k)),
                   "sin_V_median": statistics.median(st["sin_V"]), "sin_V_max": max(st["sin_V"]),
                   "sin_U2_median": statistics.median(st["sin_U2"]), "sin_U2_max": max(st["sin_U2"]),
                   "s_rel_max": max(st["s_rel"]), "ms_per_svd": 1e3 * statistics.mean(st["sec"]),
                   "exact_ms_per_svd": 1e3 * statistics.mean(exact_sec)}
            f.write(json.dumps(row) + "\n")
            print(f"{niter:>5} {row['q']:>4} {row['sin_V_median']:>15.2e} / {row['sin_V_max']:<14.2e} "
                  f"{row['sin_U2_median']:>17.2e} / {row['sin_U2_max']:<14.2e} {row['s_rel_max']:>15.2e} {row['ms_per_svd']:>11.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
