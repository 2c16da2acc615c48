"""The frozen low-rank residual that keeps the 4-bit base untouched (DESIGN section 4).

A LoRA-GA init starts the adapter at (B0, A0) != 0. Instead of re-quantizing W - s*B0*A0 into the
4-bit weights (a second rounding error), every LoRA layer carries the frozen offset as two buffers,
``qlora_ga_A0`` (r x n) and ``qlora_ga_B0`` (m x r), and computes

    y = base(x) + s * (B (A x') - B0 (A0 x')),     x' = lora_dropout(x)

The subtraction happens inside the LoRA branch, before the scaling and before the branch is added
to the base output: at init (B, A) == (B0, A0) bit for bit, so the branch is exactly zero and the
logits equal the plain 4-bit model's exactly. Equivalent view, used by the adapter export: a
rank-2r LoRA with A' = [A; A0], B' = [B, -B0], of which the second half is frozen.

Mechanics: a forward pre-hook on ``lora_A[adapter]`` keeps its input x' for the duration of the
call, and a forward hook on ``lora_B[adapter]`` subtracts ``B0 (A0 x')`` from its output. The
residual is stored in the compute dtype (bf16 on GPU, fp32 on CPU).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

A0_NAME, B0_NAME = "qlora_ga_A0", "qlora_ga_B0"


def _stash_input(module: nn.Module, args):
    module._qlora_ga_x = args[0]


def _subtract_residual(owner: nn.Module):
    def hook(module: nn.Module, args, output):
        lora_A = owner._qlora_ga_lora_A
        x = lora_A.__dict__.pop("_qlora_ga_x", None)
        if x is None:  # lora_B called without lora_A (not a path PEFT takes): leave the output alone
            return output
        a0 = getattr(owner, A0_NAME).to(x.dtype)
        b0 = getattr(owner, B0_NAME).to(x.dtype)
        return output - F.linear(F.linear(x, a0), b0)

    return hook


def attach_residual(layer: nn.Module, A0: torch.Tensor, B0: torch.Tensor, adapter_name: str = "default", dtype=None):
    """Give a PEFT LoRA layer the frozen residual ``-s * B0 @ A0`` (see module docstring)."""
    if has_residual(layer):
        detach_residual(layer)
    lora_A, lora_B = layer.lora_A[adapter_name], layer.lora_B[adapter_name]
    dtype = dtype or lora_A.weight.dtype
    device = lora_A.weight.device
    layer.register_buffer(A0_NAME, A0.detach().to(device=device, dtype=dtype).clone(), persistent=False)
    layer.register_buffer(B0_NAME, B0.detach().to(device=device, dtype=dtype).clone(), persistent=False)
    # plain attributes (not submodules), so state dicts and named_modules() stay PEFT's own
    layer.__dict__["_qlora_ga_lora_A"] = lora_A
    layer.__dict__["_qlora_ga_handles"] = (
        lora_A.register_forward_pre_hook(_stash_input),
        lora_B.register_forward_hook(_subtract_residual(layer)),
    )


def detach_residual(layer: nn.Module):
    for h in layer.__dict__.pop("_qlora_ga_handles", ()):
        h.remove()
    layer.__dict__.pop("_qlora_ga_lora_A", None)
    for name in (A0_NAME, B0_NAME):
        if name in layer._buffers:
            del layer._buffers[name]


def has_residual(layer: nn.Module) -> bool:
    return A0_NAME in getattr(layer, "_buffers", {})


def iter_residuals(model: nn.Module) -> Iterator[tuple[str, nn.Module, torch.Tensor, torch.Tensor]]:
    """Yield ``(module name, lora layer, A0, B0)`` for every layer that carries a residual."""
    for name, mod in model.named_modules():
        if has_residual(mod):
            yield name, mod, getattr(mod, A0_NAME), getattr(mod, B0_NAME)


def residual_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """``{'<module>.qlora_ga_A0': ..., '<module>.qlora_ga_B0': ...}`` for saving next to the adapter."""
    sd = {}
    for name, _, a0, b0 in iter_residuals(model):
        sd[f"{name}.{A0_NAME}"] = a0.detach().contiguous()
        sd[f"{name}.{B0_NAME}"] = b0.detach().contiguous()
    return sd


def load_residual_state_dict(model: nn.Module, sd: dict[str, torch.Tensor], adapter_name: str = "default"):
    """Re-attach residuals saved by :func:`residual_state_dict` (module names must match)."""
    modules = dict(model.named_modules())
    names = {k.rsplit(".", 1)[0] for k in sd}
    for name in sorted(names):
        if name not in modules:
            raise KeyError(f"residual for '{name}' has no matching LoRA layer in the model")
        attach_residual(modules[name], sd[f"{name}.{A0_NAME}"], sd[f"{name}.{B0_NAME}"], adapter_name,
                        dtype=sd[f"{name}.{A0_NAME}"].dtype)
