"""CUDA-only checks (marker ``cuda``; skipped with the reason on a machine without a GPU): the residual's
exact init under bf16 autocast, the DataLoader path (workers, pinned memory), and Liger Kernel (``--liger``)
keeping the exactness and training like the eager model.

The Liger checks run in a subprocess: Liger patches transformers' Llama module (RoPE, RMSNorm class) for
the whole process, which must not leak into the other tests."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from qlora_ga import estimate_factors, init_adapters, load_model
from qlora_ga.data import collate
from qlora_ga.metrics import read_metrics
from qlora_ga.train import TrainSettings, train

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

ROOT = Path(__file__).resolve().parents[1]


def _examples(vocab, n=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        L = 6 + (5 * i) % 11
        ids = torch.randint(3, vocab, (L,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": [-100] * 2 + ids[2:]})
    return out


@torch.no_grad()
def _logits(model, batch):
    with torch.autocast("cuda", dtype=torch.bfloat16):
        return model(input_ids=batch["input_ids"].cuda(), attention_mask=batch["attention_mask"].cuda()).logits


def test_residual_init_is_exact_under_bf16_autocast(tiny_model_dir):
    model, tok = load_model(tiny_model_dir, device="cuda", compute_dtype=torch.bfloat16)
    ex = _examples(len(tok))
    batch = collate(ex, tok.pad_token_id)
    before = _logits(model, batch)
    factors = estimate_factors(model, ex, rank=4, micro_batch_size=4, progress=False)
    pm = init_adapters(model, factors, method="lora-ga", rank=4, alpha=16)
    assert torch.equal(_logits(pm, batch), before)


def test_training_on_cuda_uses_workers_and_resumes_the_data_order(tiny_model_dir, tmp_path):
    from qlora_ga.train import step_loader

    model, tok = load_model(tiny_model_dir, device="cuda", compute_dtype=torch.bfloat16)
    ex = _examples(len(tok))
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
    ex = _examples(len(tok))
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
    torch.testing.assert_close(torch.tensor(res["liger"]["base"]), torch.tensor(res["eager"]["base"]), rtol=0, atol=0.1)
    el, ll = res["eager"]["losses"], res["liger"]["losses"]
    assert len(el) == len(ll) == 5 and ll[-1] < ll[0]
    assert max(abs(a - b) for a, b in zip(el, ll)) <= 0.02 * max(el), (el, ll)
