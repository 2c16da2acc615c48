"""``--fused-lora``: each 4-bit LoRA linear as one autograd Function with a hand-derived backward.

PEFT computes a 4-bit LoRA linear as several autograd nodes: bitsandbytes' 4-bit matmul, a defensive clone of
its output, then the adapter branch (for qlora-ga's residual variant, :mod:`qlora_ga.residual`: two
subtractions, two concatenations, a scaling, a matmul and an addmm, each a node of its own with its own
backward). :class:`FusedLoRA4bit` computes the same output,

    y = base(x) + h Bs^T,   h = x Acat^T,   Acat = [A; A - A0],   Bs = s [B - B0, B0]

(vanilla LoRA: ``Acat = A``, ``Bs = s B``), with one node whose backward is written out:

    gh = gy Bs                                   (N x 2r)
    gx = gy W + gh Acat                          (W dequantized again, as bitsandbytes' own backward does)
    gA = G[:r] + G[r:],   G = gh^T x             (A appears in both halves of Acat)
    gB = s (gy^T h)[:, :r]                       (B appears in the first half of Bs only)

(vanilla LoRA: ``gh = (s gy) B``, ``gB = (s gy)^T h``, ``gA = gh^T x``). It saves what bitsandbytes and the variant
saved between them (x, the 2r-wide h, the small Acat and Bs) and nothing of output size. The forward is PEFT's
to the bit (the same bitsandbytes op for ``base(x)``, then the variant's one addmm, or PEFT's scaled product),
and the backward forms the products autograd forms for PEFT's nodes, in the same order: per layer the output
and the x, A and B gradients are PEFT's bit for bit (tested). In a whole model only the order in which autograd
sums the gradients of an input shared by several linears (q/k/v, gate/up) differs (~1e-6 relative in fp32).

It applies where it computes exactly what PEFT would: a bitsandbytes ``Linear4bit`` base with a frozen bias,
one active adapter that is plain LoRA or the residual variant, no dropout while training, and one dtype for the
input, the adapter's compute and the base's compute (fp32 on CPU; under bf16/fp16 autocast, a model loaded in
that dtype). Any other call (another adapter kind, adapters disabled or merged, mixed-batch adapter names,
mismatched dtypes) runs PEFT's own forward, call by call.
"""

from __future__ import annotations

import contextlib
import types

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from .residual import A0_NAME, B0_NAME, ResidualVariant


class FusedLoRA4bit(torch.autograd.Function):
    """``base(x) + s (B A - B0 A0) x`` for a 2-D ``x`` (module docstring); A0/B0 None for vanilla LoRA."""

    @staticmethod
    def forward(ctx, x, A, B, A0, B0, scaling: float, base: nn.Module):
        import bitsandbytes as bnb

        weight = base.weight
        dt = x.dtype
        A, B = A.to(dt), B.to(dt)
        if A0 is not None:
            A0, B0 = A0.to(dt), B0.to(dt)
            Acat = torch.cat([A, A - A0])
            Bs = torch.cat([B - B0, B0], dim=1) * scaling
        else:
            Acat, Bs = A, B * scaling
        bias = None if base.bias is None else base.bias.to(dt)
        y = bnb.matmul_4bit(x, weight, bias=bias, quant_state=weight.quant_state)  # (no grad here: one 4-bit gemm)
        h = x @ Acat.t()
        if A0 is not None:
            y = torch.addmm(y, h, Bs.t())  # the variant's one addmm
        else:
            y = y + (h @ B.t()) * scaling  # PEFT's lora_B(lora_A(x)) * s, added
        ctx.save_for_backward(x, h, Acat, Bs if A0 is not None else B)
        ctx.base, ctx.scaling, ctx.rank, ctx.residual = base, scaling, A.shape[0], A0 is not None
        return y

    @staticmethod
    @once_differentiable  # (a second derivative through it raises, rather than missing the A and B terms)
    def backward(ctx, gy):
        """The products autograd forms for PEFT's nodes, in its order, so the gradients are the same bits."""
        import bitsandbytes.functional as bf

        x, h, Acat, Bm = ctx.saved_tensors
        r, s = ctx.rank, ctx.scaling
        gy = gy.to(x.dtype)
        if ctx.residual:
            gh = gy @ Bm  # Bm = Bs = s [B - B0, B0]: N x 2r
            gB = (gy.t() @ h)[:, :r] * s if ctx.needs_input_grad[2] else None
        else:
            gys = gy * s
            gh = gys @ Bm  # Bm = B: N x r
            gB = gys.t() @ h if ctx.needs_input_grad[2] else None
        gA = None
        if ctx.needs_input_grad[1]:
            gAcat = gh.t() @ x
            gA = gAcat[:r] + gAcat[r:] if ctx.residual else gAcat
        gx = None
        if ctx.needs_input_grad[0]:
            weight = ctx.base.weight
            gx = gy @ bf.dequantize_4bit(weight, weight.quant_state).to(gy.dtype)
            gx = gx + gh @ Acat
        return gx, gA, gB, None, None, None, None


def _plan(layer, x: torch.Tensor, args=(), kwargs=None) -> tuple | str:
    """``(adapter, A0, B0)`` when the fused Function computes what PEFT would for this call, else why not."""
    import bitsandbytes as bnb

    if args or kwargs:
        return "extra forward arguments"
    if layer.disable_adapters or layer.merged:
        return "adapters disabled or merged"
    if x.numel() == 0:
        return "an empty input"
    active = [a for a in layer.active_adapters if a in layer.lora_A]
    if len(active) != 1:
        return f"{len(active)} active adapters"
    (name,) = active
    variant = layer.lora_variant.get(name)
    if variant is not None and not isinstance(variant, ResidualVariant):
        return f"a {type(variant).__name__} adapter"
    base = layer.get_base_layer()
    if type(base) is not bnb.nn.Linear4bit or getattr(base.weight, "quant_state", None) is None:
        return "a base layer that is not 4-bit"
    if base.bias is not None and base.bias.requires_grad:
        return "a trained base bias"
    lora_A, lora_B = layer.lora_A[name], layer.lora_B[name]
    if lora_B.bias is not None:
        return "a LoRA bias"
    if layer.training and not isinstance(layer.lora_dropout[name], nn.Identity):
        return "lora_dropout > 0 while training"
    if getattr(base.weight.quant_state, "packing_format_for_cpu", False):
        return "bitsandbytes' CPU inference layout"  # (set by an eval-mode forward): its own path
    dt = x.dtype
    if torch.is_autocast_enabled(x.device.type):
        if torch.get_autocast_dtype(x.device.type) != dt:
            return f"a {dt} input under {torch.get_autocast_dtype(x.device.type)} autocast"
    elif lora_A.weight.dtype != dt or lora_B.weight.dtype != dt:
        return f"{lora_A.weight.dtype} adapters on a {dt} input without autocast (PEFT casts between them)"
    if base.compute_dtype is not None and base.compute_dtype != dt:
        return f"a {base.compute_dtype} 4-bit compute dtype on a {dt} input"
    if variant is None:
        return name, None, None
    A0, B0 = getattr(layer, A0_NAME), getattr(layer, B0_NAME)
    return (name, A0, B0) if A0.dtype == dt else f"a {A0.dtype} residual on a {dt} input"


def _fused_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """The fused forward of one PEFT 4-bit LoRA layer, or PEFT's own where it does not apply (module docstring)."""
    how = _plan(self, x, args, kwargs)
    if isinstance(how, str):
        return type(self).forward(self, x, *args, **kwargs)
    name, A0, B0 = how
    base = self.get_base_layer()
    if not base.compute_type_is_set:  # what bitsandbytes' forward does on its first call
        base.set_compute_type(x)
        base.compute_type_is_set = True
    y = FusedLoRA4bit.apply(x.reshape(-1, x.shape[-1]), self.lora_A[name].weight, self.lora_B[name].weight,
                            A0, B0, self.scaling[name], base)
    return y.view(*x.shape[:-1], y.shape[-1])


def _lora_4bit_layers(model) -> list:
    from peft.tuners.lora.bnb import Linear4bit as LoraLinear4bit

    return [m for m in model.modules() if isinstance(m, LoraLinear4bit)]


def fuse_lora(model) -> int:
    """Route every PEFT 4-bit LoRA layer of ``model`` through :class:`FusedLoRA4bit`; returns how many. A layer whose
    forward is already replaced on the instance (e.g. by an accelerate hook) keeps it."""
    n = 0
    for layer in _lora_4bit_layers(model):
        if is_fused(layer) or "forward" not in layer.__dict__:
            layer.forward = types.MethodType(_fused_forward, layer)
            n += 1
    return n


def unfuse_lora(model) -> None:
    """PEFT's own forward again."""
    for layer in _lora_4bit_layers(model):
        if is_fused(layer):
            del layer.__dict__["forward"]


def is_fused(layer) -> bool:
    fwd = layer.__dict__.get("forward")
    return fwd is not None and getattr(fwd, "__func__", None) is _fused_forward


def describe(model, device: torch.device, autocast) -> str:
    """One line: how many of ``model``'s fused layers a training step will run fused (probed in train mode with an
    input of the model's hidden dtype, inside ``autocast``, the training loop's autocast context), and why the
    others will not."""
    from collections import Counter

    from .arch import unwrap

    layers = [m for m in _lora_4bit_layers(model) if is_fused(m)]
    hidden = unwrap(model).get_input_embeddings().weight.dtype
    why = Counter()
    with autocast:
        for layer in layers:
            was = layer.training
            layer.train()
            how = _plan(layer, torch.zeros(1, layer.in_features, dtype=hidden, device=device))
            layer.train(was)
            if isinstance(how, str):
                why[how] += 1
    n = len(layers) - sum(why.values())
    if n == 0:
        reason = f" ({why.most_common(1)[0][0]})" if why else " (the base is not 4-bit)"
        return f"warning: --fused-lora: no 4-bit LoRA linear can be fused{reason}: PEFT's forward"
    rest = "; ".join(f"{k} in {v}" for k, v in why.most_common()) if why else ""
    return f"--fused-lora: {n} of {len(layers)} 4-bit LoRA linears as one autograd op each" + (f" (PEFT's forward: {rest})" if rest else "")


@contextlib.contextmanager
def fused(model, enabled: bool):
    """Inside: ``model``'s 4-bit LoRA layers fused (when ``enabled``); yields how many (0 when not enabled).
    PEFT's forward again on leaving (evaluation after training, export, generation)."""
    if not enabled:
        yield 0
        return
    n = fuse_lora(model)
    try:
        yield n
    finally:
        unfuse_lora(model)
