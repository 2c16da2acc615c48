"""--fused-lora (qlora_ga.fused): one autograd Function per 4-bit LoRA linear computes PEFT's forward to the bit and
its gradients by the products autograd forms, for the residual variant and for vanilla LoRA; a run trains as the
unfused one does (compiled too, with no graph break), and every call the Function does not cover goes to PEFT."""

import re

import pytest
import torch

from qlora_ga.fused import FusedLoRA4bit, fuse_lora, fused, is_fused, unfuse_lora
from qlora_ga.init import init_adapters, lora_layers
from qlora_ga.metrics import read_metrics
from qlora_ga.model import load_model
from qlora_ga.testing import assert_close_rel, random_examples
from qlora_ga.train import TrainSettings, train


def _adapted(model_dir, factors, method):
    model, tok = load_model(model_dir)
    pm = init_adapters(model, factors, method=method, rank=4)
    pm.train()
    pm.tokenizer = tok
    return pm


def _layer_call(layer, x, gy):
    """The layer's output and the gradients of x, A and B for the upstream gradient ``gy``."""
    y = layer(x)
    params = [x, layer.lora_A["default"].weight, layer.lora_B["default"].weight]
    return [y.detach(), *torch.autograd.grad(y, params, gy)]


@pytest.mark.parametrize("method", ["lora-ga", "gaussian"])  # with the residual variant / vanilla LoRA
def test_each_layer_equals_peft_values_and_gradients(tiny_model_dir, factors, method):
    pm = _adapted(tiny_model_dir, factors, method)
    layers = lora_layers(pm)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # away from the init, where the residual's halves are exact zeros
        for layer in layers.values():
            for p in (layer.lora_A["default"].weight, layer.lora_B["default"].weight):
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    for name, layer in layers.items():
        x = torch.randn(2, 7, layer.in_features, generator=g, requires_grad=True)
        gy = torch.randn(2, 7, layer.out_features, generator=g)
        ref = _layer_call(layer, x, gy)
        fuse_lora(layer)
        assert is_fused(layer)
        got = _layer_call(layer, x, gy)
        unfuse_lora(layer)
        assert not is_fused(layer)
        for what, a, e in zip(("output", "x gradient", "A gradient", "B gradient"), got, ref):
            assert_close_rel(a, e, 1e-6, f"{method} {name} {what}")  # measured: 0 (the same products, the same order)


def test_at_init_the_fused_residual_leaves_the_base_output_unchanged(tiny_model_dir, factors):
    pm = _adapted(tiny_model_dir, factors, "lora-ga")
    ids = torch.randint(3, 300, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), pm.disable_adapter():
        base = pm(input_ids=ids).logits
    with torch.no_grad(), fused(pm, True) as n:
        assert n == len(lora_layers(pm))
        out = pm(input_ids=ids).logits
    assert torch.equal(out, base)  # B - B0 and A - A0 are exact zeros


def test_a_fused_run_trains_as_the_unfused_one(tiny_model_dir, factors, tmp_path, monkeypatch, capsys):
    """Five AdamW steps with checkpointing, fused and compiled (aot_eager) against PEFT's eager forward."""
    import torch._dynamo
    from torch._dynamo.backends.registry import lookup_backend

    graphs = []

    @torch._dynamo.register_backend(name="qlora_ga_test_recording")
    def recording(gm, example_inputs):  # aot_eager, keeping each graph's code
        graphs.append("".join(m.code for m in gm.modules() if isinstance(m, torch.fx.GraphModule)))  # (nested: checkpoint)
        return lookup_backend("aot_eager")(gm, example_inputs)

    monkeypatch.setenv("QLORA_GA_COMPILE_BACKEND", "qlora_ga_test_recording")
    calls = []
    apply = FusedLoRA4bit.apply
    monkeypatch.setattr(FusedLoRA4bit, "apply", lambda *a: calls.append(1) or apply(*a))

    def run(name, **kw):
        pm = _adapted(tiny_model_dir, factors, "lora-ga")
        s = TrainSettings(batch_size=4, grad_accum=1, lr=1e-3, max_steps=5, optim="adamw", padding_free=False, **kw)
        summary = train(pm, pm.tokenizer, random_examples(n=20, seed=1), [], s, tmp_path / name, progress=False)
        losses = [r["loss"] for r in read_metrics(tmp_path / name / "metrics.jsonl") if "loss" in r]
        adapter = torch.cat([p.detach().flatten() for p in pm.parameters() if p.requires_grad])
        return losses, adapter, summary, pm

    ref_losses, ref_adapter, _, _ = run("peft")
    assert not calls
    losses, adapter, _, pm = run("fused", fused_lora=True)
    assert len(calls) >= 5 * 21  # every LoRA linear of every step (3 layers x 7 linears), and the recompute
    assert_close_rel(losses, ref_losses, 1e-5, "per-step losses")  # measured: equal at the metrics' 6 decimals
    assert_close_rel(adapter, ref_adapter, 1e-4, "adapter after 5 steps")  # measured: 1.4e-6
    assert not any(is_fused(layer) for layer in lora_layers(pm).values())  # PEFT's forward again after training
    assert "--fused-lora: 21 of 21 4-bit LoRA linears as one autograd op each\n" in capsys.readouterr().out
    losses, adapter, summary, pm = run("fused_compiled", fused_lora=True, compile=True)
    rep = summary["compile"]  # padded micro-batches: whole blocks compiled
    assert rep["graph_breaks"] == 0 and rep["graphs"] >= 1 and rep["blocks"] == 3 and rep["parts"] == "block", rep
    # the Function is traced into the block's graph (7 linears per block), not run beside it (bitsandbytes' own
    # MatMul4Bit is an autograd Function too: the fused one is the one taking the LoRA weights)
    fused_calls = [len(re.findall(r"autograd_function_apply\([^\n]*lora_a_modules_default", c)) for c in graphs]
    assert graphs and all(n == 7 for n in fused_calls), fused_calls
    assert_close_rel(losses, ref_losses, 1e-5, "per-step losses, compiled")  # measured: equal at 6 decimals
    # after training the blocks are eager and the layers PEFT's again (evaluation, generation and export)
    layers = lora_layers(pm)
    assert all(m._compiled_call_impl is None for m in pm.modules()) and not any(map(is_fused, layers.values()))


def test_calls_the_function_does_not_cover_go_to_peft(tiny_model_dir, factors, monkeypatch):
    """Dropout while training, adapters disabled, a dtype PEFT would cast: PEFT's own forward, the same result."""
    pm = _adapted(tiny_model_dir, factors, "lora-ga")
    layer = next(iter(lora_layers(pm).values()))
    calls = []
    apply = FusedLoRA4bit.apply
    monkeypatch.setattr(FusedLoRA4bit, "apply", lambda *a: calls.append(1) or apply(*a))
    x = torch.randn(3, layer.in_features, generator=torch.Generator().manual_seed(2))
    fuse_lora(layer)
    layer(x)
    assert len(calls) == 1  # the covered case, for contrast
    with pm.disable_adapter():
        layer(x)
    layer.lora_dropout["default"] = torch.nn.Dropout(0.1)
    torch.manual_seed(3)
    got = layer(x)
    unfuse_lora(layer)
    torch.manual_seed(3)
    assert torch.equal(got, layer(x))
    fuse_lora(layer)
    layer.eval()  # no dropout in eval mode: fused again
    layer(x)
    assert len(calls) == 2
    layer(x.double())  # PEFT casts to the adapter's dtype and back
    assert len(calls) == 2


def test_a_base_without_4bit_linears_is_said_and_trains_on_peft(tiny_model_dir, factors, tmp_path, capsys):
    model, tok = load_model(tiny_model_dir, quantize=False, device="cpu")
    pm = init_adapters(model, factors, method="lora-ga", rank=4)
    s = TrainSettings(batch_size=4, grad_accum=1, lr=1e-3, max_steps=1, optim="adamw", fused_lora=True)
    train(pm, tok, random_examples(n=4, seed=1), [], s, tmp_path / "run", progress=False)
    out = capsys.readouterr().out
    assert "warning: --fused-lora: no 4-bit LoRA linear can be fused (the base is not 4-bit): PEFT's forward" in out


def test_what_it_will_not_do_is_said_or_refused(tiny_model_dir, factors):
    """The run's line counts the layers a training step will fuse and names why not; a second derivative raises
    instead of missing the A and B terms; a forward already patched on an instance (e.g. an accelerate hook) is kept."""
    import contextlib

    from qlora_ga.fused import describe

    pm = _adapted(tiny_model_dir, factors, "lora-ga")
    layers = list(lora_layers(pm).values())
    cpu, no_autocast = torch.device("cpu"), contextlib.nullcontext()
    hooked = layers[0]
    hooked.forward = lambda x, *a, **k: type(hooked).forward(hooked, x, *a, **k) * 1  # stands for a hook's wrapper
    with fused(pm, True) as n:
        assert n == len(layers) - 1 and not is_fused(hooked)
        assert describe(pm, cpu, no_autocast) == f"--fused-lora: {n} of {n} 4-bit LoRA linears as one autograd op each"
        for layer in layers:
            layer.lora_dropout["default"] = torch.nn.Dropout(0.05)
        assert describe(pm, cpu, no_autocast) == ("warning: --fused-lora: no 4-bit LoRA linear can be fused "
                                                  "(lora_dropout > 0 while training): PEFT's forward")
        for layer in layers:
            layer.lora_dropout["default"] = torch.nn.Identity()
        layer = layers[1]
        x = torch.randn(3, layer.in_features, requires_grad=True)
        (gx,) = torch.autograd.grad(layer(x).square().sum(), x, create_graph=True)
        with pytest.raises(RuntimeError, match="once_differentiable"):
            gx.square().sum().backward()
    assert "forward" in hooked.__dict__  # left as it was
