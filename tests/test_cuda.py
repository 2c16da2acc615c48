"""Behaviour that exists only on a CUDA GPU: the GPU dtype choice, autocast (the residual's exact init),
paged optimizers, the DataLoader path (workers, pinned memory), ``--fused-lora`` with ``--compile``, and Liger
Kernel (``--liger``).

All marked ``cuda``: they run with ``QLORA_GA_TEST_CUDA=1 python -m pytest -m cuda tests`` on a GPU
machine and skip elsewhere (see conftest.py). The CPU-and-CUDA tests of the fp16 paths are in
test_cuda_paths.py. The Liger checks run in a subprocess: Liger patches transformers' Llama module
(RoPE, RMSNorm class) for the whole process, which must not leak into the other tests.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from qlora_ga import estimate_factors, gradient_pass, init_adapters, load_model
from qlora_ga.data import collate
from qlora_ga.estimate import make_micro_batches
from qlora_ga.metrics import read_metrics
from qlora_ga.testing import assert_close_rel, random_examples, reference_gradients
from qlora_ga.train import TrainSettings, train

pytestmark = pytest.mark.cuda

ROOT = Path(__file__).resolve().parents[1]



@torch.no_grad()
def _logits(model, batch):
    with torch.autocast("cuda", dtype=torch.bfloat16):
        return model(input_ids=batch["input_ids"].cuda(), attention_mask=batch["attention_mask"].cuda()).logits


def test_default_compute_dtype_matches_this_gpu(tiny_model_dir):
    model, _ = load_model(tiny_model_dir, device="cuda")
    major, _ = torch.cuda.get_device_capability()
    assert model.config.dtype == (torch.bfloat16 if major >= 8 else torch.float16)


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_gradient_pass_on_gpu_matches_fp32_autograd(tiny_model_dir, dtype):
    model, _ = load_model(tiny_model_dir, device="cuda", compute_dtype=dtype)
    ex = random_examples()
    ref = reference_gradients(tiny_model_dir, model, make_micro_batches(ex, len(ex))[0])
    G = gradient_pass(model, ex, lambda n, g: g.cpu(), micro_batch_size=4, progress=False)
    for n in ref:  # 16-bit activations; fp32 accumulation of G (bf16 on the CPU: 1.9e-2 of the largest entry)
        assert_close_rel(G[n], ref[n], 3e-2, f"G, {dtype}")
    from qlora_ga.estimate import accumulate

    assert accumulate._MM_OUT_FP32, "the 16-bit GEMM with fp32 output fell back to fp32 casts"


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_residual_keeps_the_function_under_autocast(tiny_model_dir, dtype):
    from qlora_ga.model import autocast

    model, _ = load_model(tiny_model_dir, device="cuda", compute_dtype=dtype)
    ex = random_examples()
    batch = {k: v.cuda() for k, v in collate(ex, 0).items()}
    compute = model.config.dtype
    with torch.no_grad(), autocast(torch.device("cuda"), compute):
        before = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    factors = estimate_factors(model, ex, rank=4, micro_batch_size=4, progress=False)
    pm = init_adapters(model, factors, method="lora-ga", rank=4, alpha=16)
    with torch.no_grad(), autocast(torch.device("cuda"), compute):
        after = pm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    assert_close_rel(after, before, 1e-5, "logits at init")  # the branch B A x - B0 A0 x is exactly zero


def test_fused_lora_under_bf16_autocast_keeps_the_init_and_trains_like_peft(tiny_model_dir, tmp_path):
    """--fused-lora with --compile (inductor) on the GPU: the fused layers run eager at init (bf16 input, bf16
    autocast) and keep the residual's init exact; 5 compiled steps follow PEFT's eager forward within bf16
    rounding, with no graph break."""
    from qlora_ga.fused import FusedLoRA4bit, fused
    from qlora_ga.model import autocast

    ex = random_examples()
    batch = {k: v.cuda() for k, v in collate(ex, 0).items()}
    runs = {}
    for name, kw in (("peft", {}), ("fused", {"fused_lora": True, "compile": True})):
        model, tok = load_model(tiny_model_dir, device="cuda", compute_dtype="bf16")
        factors = estimate_factors(model, ex, rank=4, micro_batch_size=4, progress=False)
        pm = init_adapters(model, factors, method="lora-ga", rank=4, alpha=16)
        if name == "fused":
            calls = []
            apply = FusedLoRA4bit.apply
            FusedLoRA4bit.apply = lambda *a: calls.append(1) or apply(*a)
            try:
                with torch.no_grad(), autocast(torch.device("cuda"), torch.bfloat16):
                    with pm.disable_adapter():
                        base = pm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
                    with fused(pm, True):
                        at_init = pm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
            finally:
                FusedLoRA4bit.apply = apply
            assert calls, "the fused Function did not run under bf16 autocast"
            assert_close_rel(at_init, base, 1e-5, "logits at init, fused")  # B - B0 and A - A0 are exact zeros
        s = TrainSettings(batch_size=4, grad_accum=1, lr=2e-3, max_steps=5, optim="adamw", **kw)
        summary = train(pm, tok, random_examples(n=20, seed=1), [], s, tmp_path / name, progress=False)
        runs[name] = [r["loss"] for r in read_metrics(tmp_path / name / "metrics.jsonl") if "loss" in r]
        if name == "fused":
            assert summary["compile"]["graph_breaks"] == 0 and summary["compile"]["graphs"] >= 1, summary["compile"]
    assert_close_rel(runs["fused"], runs["peft"], 2e-2, "per-step losses, bf16")


def test_paged_adamw_32bit_steps_like_adamw(tiny_model_dir):
    from qlora_ga.train import TrainSettings, build_optimizer

    model, _ = load_model(tiny_model_dir, device="cuda")
    pm = init_adapters(model, None, method="gaussian", rank=4)
    params = [p for p in pm.parameters() if p.requires_grad]
    start = [p.detach().clone() for p in params]
    g = torch.Generator(device="cuda").manual_seed(0)
    grads = [torch.randn(p.shape, generator=g, device="cuda", dtype=p.dtype) for p in params]
    results = []
    for optim in ("paged_adamw_32bit", "adamw"):
        with torch.no_grad():
            for p, s0 in zip(params, start):
                p.copy_(s0)
        opt = build_optimizer(pm, TrainSettings(lr=1e-2, optim=optim), torch.device("cuda"))
        for _ in range(3):
            for p, gr in zip(params, grads):
                p.grad = gr.clone()
            opt.step()
        results.append([p.detach().clone() for p in params])
        if optim == "paged_adamw_32bit":
            import bitsandbytes as bnb

            assert isinstance(opt, bnb.optim.PagedAdamW32bit)
    for a, b in zip(*results):
        assert_close_rel(a, b, 1e-4, "adapter weights")


@pytest.mark.parametrize("optim", ["paged_adamw_32bit", "paged_adamw_8bit"])
@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_cli_trains_on_the_gpu(tiny_model_dir, tmp_path, optim, dtype):
    from qlora_ga.cli import main
    from qlora_ga.metrics import read_metrics

    args = ["--model", str(tiny_model_dir), "--output-dir", str(tmp_path / "o"), "--n-builtin", "48", "--max-length", "128",
            "--batch-size", "4", "--grad-accum", "2", "--init-samples", "8", "--sample-prompts", "0", "--max-steps", "6",
            "--lr", "2e-3", "--device", "cuda", "--compute-dtype", dtype, "--optim", optim]
    assert main(args) == 0
    rows = [r for r in read_metrics(tmp_path / "o" / "metrics.jsonl") if r.get("loss") is not None]
    assert len(rows) == 6 and rows[-1]["loss"] < rows[0]["loss"]


def test_training_on_cuda_uses_workers_and_resumes_the_data_order(tiny_model_dir, tmp_path):
    from qlora_ga.train import step_loader

    model, tok = load_model(tiny_model_dir, device="cuda", compute_dtype=torch.bfloat16)
    ex = random_examples(len(tok))
    s = TrainSettings(batch_size=2, grad_accum=2, lr=1e-3, max_steps=4, optim="adamw", group_by_length=True)
    loader = step_loader(ex, s, tok.pad_token_id, 2, 4, torch.device("cuda"))
    assert loader.num_workers > 0 and loader.pin_memory
    item = next(iter(loader))
    assert all(t.is_pinned() for b in item["micro_batches"] for t in b.values())
    pm = init_adapters(model, None, method="gaussian", rank=4)
    train(pm, tok, ex, [], s, tmp_path, progress=False, compute_dtype=torch.bfloat16)
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and all(r["loss"] > 0 and r["tokens_per_s"] > 0 for r in rows)


LIGER_SCRIPT = r"""
import json, sys, torch
from qlora_ga import estimate_factors, init_adapters, load_model
from qlora_ga.data import collate
from qlora_ga.kernels import apply_liger
from qlora_ga.metrics import read_metrics
from qlora_ga.train import TrainSettings, train
sys.path.insert(0, sys.argv[3])
from test_cuda import _examples, _logits

model_dir, out = sys.argv[1], sys.argv[2]
res = {}
for impl in ("eager", "liger"):  # eager first: Liger's RoPE patch is process-wide
    torch.manual_seed(0)
    model, tok = load_model(model_dir, device="cuda", compute_dtype=torch.bfloat16)
    if impl == "liger":
        res["model_type"] = apply_liger(model, "cuda")
    ex = random_examples(len(tok))
    batch = collate(ex, tok.pad_token_id)
    base = _logits(model, batch)
    factors = estimate_factors(model, ex, rank=4, micro_batch_size=4, progress=False, svd="exact")
    pm = init_adapters(model, factors, method="lora-ga", rank=4, alpha=16)
    init = _logits(pm, batch)
    s = TrainSettings(batch_size=4, grad_accum=2, lr=1e-3, max_steps=5, warmup=0, optim="adamw")
    train(pm, tok, ex, [], s, f"{out}/{impl}", progress=False, compute_dtype=torch.bfloat16)
    res[impl] = {"init_exact": bool(torch.equal(init, base)), "base": base.float().cpu().tolist(),
                 "losses": [r["loss"] for r in read_metrics(f"{out}/{impl}/metrics.jsonl")]}
print("RESULT " + json.dumps(res))
"""


def test_liger_keeps_the_init_exact_and_trains_like_the_eager_model(tiny_model_dir, tmp_path):
    pytest.importorskip("liger_kernel", reason="liger-kernel is not installed (pip install 'qlora-ga[liger]')")
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    proc = subprocess.run([sys.executable, "-c", LIGER_SCRIPT, str(tiny_model_dir), str(tmp_path), str(ROOT / "tests")],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT "))[len("RESULT "):])
    assert res["model_type"] == "llama"
    assert res["eager"]["init_exact"] and res["liger"]["init_exact"]  # the residual is exact with Liger's kernels too
    # Liger's kernels are not bitwise eager's: the same function up to bf16 rounding
    # 3.5e-2 of the largest logit (about 2.9): the former 0.1 absolute (bf16 autocast alone moves them 1.5e-2 on the CPU)
    assert_close_rel(torch.tensor(res["liger"]["base"]), torch.tensor(res["eager"]["base"]), 3.5e-2, "logits")
    el, ll = res["eager"]["losses"], res["liger"]["losses"]
    assert len(el) == len(ll) == 5 and ll[-1] < ll[0]
    assert_close_rel(ll, el, 0.02, "losses")
