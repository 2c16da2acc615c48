"""The optimizers (bitsandbytes paged AdamW, torch AdamW, LoRA-One's preconditioned AdamW, Prodigy), and the
settings a resumed optimizer follows."""

from __future__ import annotations

import warnings

import torch

from ..errors import QloraGaError
from ..config import TrainSettings


def trainable_parameters(model) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def build_optimizer(model, s: TrainSettings, device: torch.device):
    params = trainable_parameters(model)
    kw = dict(lr=s.lr, weight_decay=s.weight_decay)
    if s.optim in ("adamw", "lora-one-precond"):
        return torch.optim.AdamW(params, **kw)
    if s.optim == "prodigy":
        return build_prodigy(params, s)
    if s.optim not in ("paged_adamw_32bit", "paged_adamw_8bit"):
        raise QloraGaError(f"unknown --optim '{s.optim}': use paged_adamw_32bit, paged_adamw_8bit, adamw, lora-one-precond or prodigy")
    if device.type != "cuda":
        # paged (unified-memory) optimizers exist only on CUDA; identical update rule without paging
        warnings.warn(f"--optim {s.optim} needs CUDA: using torch AdamW on {device.type}", stacklevel=2)
        return torch.optim.AdamW(params, **kw)
    import bitsandbytes as bnb

    cls = bnb.optim.PagedAdamW32bit if s.optim == "paged_adamw_32bit" else bnb.optim.PagedAdamW8bit
    return cls(params, **kw)


def build_prodigy(params, s: TrainSettings):
    """Prodigy (Mishchenko & Defazio 2024, the ``prodigyopt`` package): Adam whose step size ``d`` is
    estimated on the fly, so the lr is a multiplier (1.0) of it. Bias correction and the warmup
    safeguard are on, as its authors advise with a warmup schedule. ``d`` lives in the param group,
    so it is saved and restored with the optimizer state (exact resume); the trainer logs it."""
    try:
        from prodigyopt import Prodigy
    except ImportError:
        raise QloraGaError("--optim prodigy needs the prodigyopt package: pip install prodigyopt (or the [prodigy] extra)") from None
    return Prodigy(params, lr=s.lr, weight_decay=s.weight_decay, use_bias_correction=True, safeguard_warmup=True)


def precondition_lora_grads(model, lam: float = 1e-6):
    """LoRA-One's preconditioner (docs/DESIGN.md section 5): g_A <- (B^T B + lam I)^-1 g_A, g_B <- g_B (A A^T + lam I)^-1."""
    from ..init import lora_layers

    for layer in lora_layers(model).values():
        for name in layer.active_adapters:
            A, B = layer.lora_A[name].weight, layer.lora_B[name].weight
            r = A.shape[0]
            eye = torch.eye(r, device=A.device, dtype=torch.float32)
            # solve_ex: no per-layer device sync for an error check (the matrices are positive definite for lam > 0)
            if A.grad is not None:
                A.grad.copy_(torch.linalg.solve_ex(B.float().T @ B.float() + lam * eye, A.grad.float())[0].to(A.grad.dtype))
            if B.grad is not None:
                B.grad.copy_(torch.linalg.solve_ex(A.float() @ A.float().T + lam * eye, B.grad.float().T)[0].T.to(B.grad.dtype))


def follow_settings(optimizer, scheduler, s: TrainSettings) -> None:
    """After loading a checkpoint's optimizer and scheduler: the peak lr and weight decay of ``s``, and the lr of
    the current step on the schedule built for ``s`` (its warmup and length). Unchanged settings give the saved
    values back bit for bit (the same formula the scheduler's own step uses)."""
    scheduler.base_lrs = [s.lr] * len(optimizer.param_groups)
    for group, fn in zip(optimizer.param_groups, scheduler.lr_lambdas):
        group["initial_lr"] = s.lr
        group["lr"] = s.lr * fn(scheduler.last_epoch)
        group["weight_decay"] = s.weight_decay
    scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]
