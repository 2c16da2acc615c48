"""Behaviour that exists only on a CUDA GPU: autocast, paged optimizers, the GPU dtype choice.

All marked ``cuda``: they run with ``QLORA_GA_TEST_CUDA=1 python -m pytest -m cuda tests`` on a GPU
machine and skip elsewhere (see conftest.py). The CPU-and-CUDA tests of the fp16 paths are in
test_cuda_paths.py.
"""

import pytest
import torch

from qlora_ga import estimate_factors, gradient_pass, init_adapters, load_model
from qlora_ga.data import collate
from qlora_ga.gradient import make_micro_batches
from qlora_ga.testing import reference_gradients

pytestmark = pytest.mark.cuda


def _examples(n=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        ids = torch.randint(3, 384, (6 + i % 7,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": [-100] * 2 + ids[2:]})
    return out


def test_default_compute_dtype_matches_this_gpu(tiny_model_dir):
    model, _ = load_model(tiny_model_dir, device="cuda")
    major, _ = torch.cuda.get_device_capability()
    assert model.config.dtype == (torch.bfloat16 if major >= 8 else torch.float16)


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_gradient_pass_on_gpu_matches_fp32_autograd(tiny_model_dir, dtype):
    model, _ = load_model(tiny_model_dir, device="cuda", compute_dtype=dtype)
    ex = _examples()
    ref = reference_gradients(tiny_model_dir, model, make_micro_batches(ex, len(ex))[0])
    G = gradient_pass(model, ex, lambda n, g: g.cpu(), micro_batch_size=4, progress=False)
    worst = max(float(torch.linalg.norm(G[n] - ref[n]) / torch.linalg.norm(ref[n])) for n in ref)
    assert worst < 3e-2, worst  # 16-bit activations; fp32 accumulation of G


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_residual_keeps_the_function_under_autocast(tiny_model_dir, dtype):
    from qlora_ga.train import _autocast

    model, _ = load_model(tiny_model_dir, device="cuda", compute_dtype=dtype)
    ex = _examples()
    batch = {k: v.cuda() for k, v in collate(ex, 0).items()}
    compute = model.config.dtype
    with torch.no_grad(), _autocast(torch.device("cuda"), compute):
        before = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    factors = estimate_factors(model, ex, rank=4, micro_batch_size=4, progress=False)
    pm = init_adapters(model, factors, method="lora-ga", rank=4, alpha=16)
    with torch.no_grad(), _autocast(torch.device("cuda"), compute):
        after = pm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    assert float((after - before).abs().max()) <= 1e-5  # the branch B A x - B0 A0 x is exactly zero


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
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


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
