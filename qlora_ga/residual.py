"""The frozen low-rank residual that keeps the 4-bit base untouched (docs/DESIGN.md section 4).

A LoRA-GA init starts the adapter at (B0, A0) != 0. Instead of re-quantizing W - s*B0*A0 into the
4-bit weights (a second rounding error), every LoRA layer carries the frozen offset as two buffers,
``qlora_ga_A0`` (r x n) and ``qlora_ga_B0`` (m x r), and computes

    y = base(x) + s * (B A x' - B0 A0 x'),     x' = lora_dropout(x)

as ONE rank-2r LoRA product, written in the difference form

    B A - B0 A0 = [B - B0, B0] [A; A - A0]      (= (B - B0) A + B0 (A - A0))

    h = [A; A - A0] x'                      one matmul, 2r outputs
    y = base(x) + h [s (B - B0), s B0]^T     one addmm, accumulating straight into base(x)

At init (B, A) == (B0, A0) bit for bit, so ``B - B0`` and ``A - A0`` are exact zeros, every term of
the branch is an exact zero whatever order the matmuls sum in, and the logits equal the plain 4-bit
model's exactly. The plain stacked form ``[B, -B0] [A; A0]`` would not be exact: one matmul sums
``B h - B0 h`` term by term, and such a sum is not exactly zero in floating point. The weights are
rebuilt on every call (two r x n / m x r subtractions and concatenations, nothing of activation
size), so autograd sends the gradient of both halves to the trainable A and B; A0 and B0 are
buffers, outside the optimizer and its weight decay. Scaling the small matrix instead of the
output and adding into base(x) with addmm makes the branch one pass over x and one over the output,
where PEFT's own rank-r branch (``lora_B(lora_A(x)) * s`` then ``+``) makes three extra passes over
the output: the residual costs rank, not memory traffic.

Mechanics: a PEFT LoRA variant (``peft.tuners.lora.layer.LoraVariant``, the dispatch DoRA uses)
registered in ``layer.lora_variant[adapter]``: no hooks, and PEFT's own merge/unmerge include the
residual. The residual is stored in the compute dtype (bf16 on GPU, fp32 on CPU); under autocast
the branch is computed in that dtype (the values autocast would round the adapter to), so the
init stays exact there too. Equivalent view, used by the adapter export: a rank-2r LoRA with
A' = [A; A0], B' = [B, -B0], of which the second half is frozen.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from peft.tuners.lora.layer import LoraVariant
from torch import nn

A0_NAME, B0_NAME = "qlora_ga_A0", "qlora_ga_B0"


def _delta_weight(module: nn.Module, adapter: str) -> torch.Tensor:
    """``s (B A - B0 A0)`` in fp32 (the full-size weight update, for PEFT's merge/unmerge)."""
    A, B = module.lora_A[adapter].weight.float(), module.lora_B[adapter].weight.float()
    A0, B0 = getattr(module, A0_NAME).float(), getattr(module, B0_NAME).float()
    return (B @ A - B0 @ A0) * module.scaling[adapter]


class ResidualVariant(LoraVariant):
    """LoRA with the frozen residual ``-s B0 A0``, computed as one rank-2r product (module docstring)."""

    def supports_lora_conversion(self) -> bool:
        return False  # PEFT's conversion reads get_delta_weight, which does not know the residual

    @staticmethod
    def init(module: nn.Module, adapter_name: str, **kwargs) -> None:
        pass  # the buffers are set by attach_residual

    @staticmethod
    def merge_safe(module, active_adapter: str, orig_weight: torch.Tensor) -> torch.Tensor:
        return orig_weight + _delta_weight(module, active_adapter).to(orig_weight.dtype)

    @staticmethod
    def merge_unsafe(module, active_adapter: str, orig_weight: torch.Tensor) -> None:
        orig_weight.data += _delta_weight(module, active_adapter).to(orig_weight.dtype)

    @staticmethod
    def unmerge(module, active_adapter: str, orig_weight: torch.Tensor) -> torch.Tensor:
        return orig_weight.data - _delta_weight(module, active_adapter).to(orig_weight.dtype)

    @staticmethod
    def forward(module, active_adapter: str, x: torch.Tensor, result: torch.Tensor, **kwargs) -> torch.Tensor:
        A0, B0 = getattr(module, A0_NAME), getattr(module, B0_NAME)
        # under autocast: the dtype the residual was rounded to (= what autocast makes of A and B)
        dt = A0.dtype if torch.is_autocast_enabled(x.device.type) else x.dtype
        A = module.lora_A[active_adapter].weight.to(dt)
        B = module.lora_B[active_adapter].weight.to(dt)
        A0, B0 = A0.to(dt), B0.to(dt)
        s = module.scaling[active_adapter]
        x = module.lora_dropout[active_adapter](x)
        h = F.linear(x.reshape(-1, x.shape[-1]), torch.cat([A, A - A0]))  # [A x'; (A - A0) x']
        B2 = torch.cat([B - B0, B0], dim=1) * s
        res = result.reshape(-1, result.shape[-1])
        if res.dtype == h.dtype:
            out = torch.addmm(res, h, B2.t())
        else:  # e.g. an fp32 residual stream under bf16 autocast: add without rounding base(x) to h's dtype
            out = res + F.linear(h, B2)
        return out.view(*result.shape[:-1], out.shape[-1])


def attach_residual(layer: nn.Module, A0: torch.Tensor, B0: torch.Tensor, adapter_name: str = "default", dtype=None):
    """Give a PEFT LoRA layer the frozen residual ``-s * B0 @ A0`` (see module docstring)."""
    if has_residual(layer):
        detach_residual(layer)
    lora_A = layer.lora_A[adapter_name]
    dtype = dtype or lora_A.weight.dtype
    device = lora_A.weight.device
    layer.register_buffer(A0_NAME, A0.detach().to(device=device, dtype=dtype).clone(), persistent=False)
    layer.register_buffer(B0_NAME, B0.detach().to(device=device, dtype=dtype).clone(), persistent=False)
    layer.lora_variant[adapter_name] = ResidualVariant()


def detach_residual(layer: nn.Module):
    for name in [k for k, v in layer.lora_variant.items() if isinstance(v, ResidualVariant)]:
        del layer.lora_variant[name]
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
