"""The frozen residual as a PEFT LoRA variant (one rank-2r product, no hooks): exact at init, the same
training as the hook implementation it replaced, PEFT's merge, autocast."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qlora_ga import estimate_factors, init_adapters, load_model
from qlora_ga.init import lora_layers
from qlora_ga.metrics import read_metrics
from qlora_ga.residual import (A0_NAME, B0_NAME, ResidualVariant, attach_residual, detach_residual, has_residual,
                               iter_residuals)
from qlora_ga.testing import assert_close_rel, random_examples
from qlora_ga.train import TrainSettings, train


# ------------------------------------------------------------------ the reference: the hook implementation it replaced


def _attach_hook_residual(layer, adapter="default"):
    """The previous mechanism, kept here as the reference: a forward pre-hook on lora_A stashes x',
    a forward hook on lora_B subtracts B0 (A0 x') from its output (same buffers)."""
    A0, B0 = getattr(layer, A0_NAME), getattr(layer, B0_NAME)
    del layer.lora_variant[adapter]  # back to PEFT's vanilla branch lora_B(lora_A(x')) * s
    lora_A, lora_B = layer.lora_A[adapter], layer.lora_B[adapter]
    stash = {}

    def pre(module, args):
        stash["x"] = args[0]

    def post(module, args, output):
        x = stash.pop("x")
        return output - F.linear(F.linear(x, A0.to(x.dtype)), B0.to(x.dtype))

    lora_A.register_forward_pre_hook(pre)
    lora_B.register_forward_hook(post)



def _lora_ga(model_dir, factors, dropout):
    model, tok = load_model(model_dir)
    return init_adapters(model, factors, method="lora-ga", rank=4, alpha=16, lora_dropout=dropout), tok


@torch.no_grad()
def _logits(model, batch):
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def test_five_training_steps_match_the_hook_implementation(tiny_model_dir, tmp_path):
    from qlora_ga.data import collate

    model, tok = load_model(tiny_model_dir)
    ex = random_examples(len(tok))
    batch = collate(ex, tok.pad_token_id)
    base_logits = _logits(model, batch)
    factors = estimate_factors(model, ex, rank=4, micro_batch_size=4, progress=False)  # one init for both
    del model
    losses, weights = {}, {}
    for impl in ("variant", "hooks"):
        pm, tok = _lora_ga(tiny_model_dir, factors, dropout=0.1)
        layers = lora_layers(pm)
        assert len(layers) == 21 and all(isinstance(layer.lora_variant["default"], ResidualVariant) for layer in layers.values())
        if impl == "hooks":
            for layer in layers.values():
                _attach_hook_residual(layer)
        # the branch is exactly zero at init: logits bit for bit the 4-bit model's
        assert torch.equal(_logits(pm, batch), base_logits), impl
        torch.manual_seed(0)  # the same dropout masks in both runs
        s = TrainSettings(batch_size=4, grad_accum=2, lr=2e-3, max_steps=5, warmup=0, optim="adamw", weight_decay=0.1,
                          gradient_checkpointing=True)
        train(pm, tok, ex, [], s, tmp_path / impl, progress=False)
        losses[impl] = [r["loss"] for r in read_metrics(tmp_path / impl / "metrics.jsonl")]
        weights[impl] = {n: p.detach().clone() for n, p in pm.named_parameters() if p.requires_grad}
        assert all(not p.requires_grad for n, p in pm.named_parameters() if "lora_" not in n)
    assert len(losses["variant"]) == 5 and losses["variant"][-1] < losses["variant"][0]
    err = assert_close_rel(losses["variant"], losses["hooks"], 1e-5, "losses")  # measured 2e-7
    print(f"5 steps, rank-2r variant vs hooks: max |dloss| = {err:.1e} of the largest loss")
    for n, p in weights["variant"].items():
        assert_close_rel(p, weights["hooks"][n], 1e-4, "adapter weights")  # measured 8e-7 after 5 AdamW steps


# ------------------------------------------------------------------ the variant on a plain (non-quantized) LoRA layer


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj = nn.Linear(32, 24)

    def forward(self, x):
        return self.q_proj(x)


def _plain_lora(dropout=0.0):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(1)
    pm = get_peft_model(_Net(), LoraConfig(r=4, lora_alpha=8, use_rslora=True, target_modules=["q_proj"], lora_dropout=dropout))
    layer = pm.base_model.model.q_proj
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_(0, 0.3)
    return pm, layer


def test_variant_equals_its_formula_in_value_and_gradient():
    pm, layer = _plain_lora()
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    g = torch.Generator().manual_seed(2)
    A0, B0 = torch.randn(A.shape, generator=g), torch.randn(B.shape, generator=g)
    attach_residual(layer, A0, B0)
    assert has_residual(layer) and len(list(iter_residuals(pm))) == 1
    x = torch.randn(3, 5, 32, generator=g)
    s = layer.scaling["default"]
    y = pm(x)
    Ar, Br = A.detach().clone().requires_grad_(True), B.detach().clone().requires_grad_(True)
    ref = layer.base_layer(x) + s * (x @ Ar.T @ Br.T - x @ A0.T @ B0.T)
    # bounds relative to the largest entry (fp32, 32-term sums: measured at most 6e-7)
    assert_close_rel(y, ref, 1e-5, "output")
    w = torch.randn(y.shape, generator=g)
    (y * w).sum().backward()
    (ref * w).sum().backward()
    assert_close_rel(A.grad, Ar.grad, 1e-5, "A.grad")
    assert_close_rel(B.grad, Br.grad, 1e-5, "B.grad")
    assert getattr(layer, A0_NAME).grad is None and not getattr(layer, B0_NAME).requires_grad
    # PEFT's own merge includes the residual: merged weights compute the same function
    merged = pm.merge_and_unload()
    assert_close_rel(merged(x), ref, 1e-5, "merged output")


def test_detach_gives_back_vanilla_lora():
    pm, layer = _plain_lora()
    x = torch.randn(2, 32)
    plain = pm(x)
    attach_residual(layer, layer.lora_A["default"].weight * 2, layer.lora_B["default"].weight)
    assert not torch.allclose(pm(x), plain)
    detach_residual(layer)
    assert not has_residual(layer) and "default" not in layer.lora_variant
    assert torch.equal(pm(x), plain)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_exact_zero_at_init_also_under_autocast_and_dropout(dtype):
    pm, layer = _plain_lora(dropout=0.2)
    pm.train()
    # the residual is stored in the compute dtype, as init_adapters does (bf16 rounding of A and B, as autocast's)
    attach_residual(layer, layer.lora_A["default"].weight, layer.lora_B["default"].weight, dtype=dtype)
    x = torch.randn(4, 7, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        y, base = pm(x), layer.base_layer(x)
    assert y.dtype == base.dtype and torch.equal(y, base)


def test_base_output_in_fp32_under_bf16_autocast_is_not_rounded():
    # a 4-bit layer returns its input's dtype: an fp32 residual stream stays fp32 under autocast
    pm, layer = _plain_lora()
    attach_residual(layer, layer.lora_A["default"].weight, layer.lora_B["default"].weight, dtype=torch.bfloat16)
    x = torch.randn(4, 7, 32)
    result = torch.randn(4, 7, 24) * 100
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = ResidualVariant.forward(layer, "default", x, result)
    assert out.dtype == torch.float32 and torch.equal(out, result)
