"""Step 3 of the pipeline: LoRA adapters started from the gradient's SVD (docs/DESIGN.md section 3).

Methods (G is a module's m x n mean gradient, ``G ~= U diag(S) V^T``):

- ``lora-ga`` (Wang et al. 2024, ArB2r + stable scale): ``A0 = V[:, :r]^T c``, ``B0 = U[:, r:2r] c``,
  ``c = m^(1/4) / sqrt(gamma)``; rsLoRA scaling ``s = alpha / sqrt(r)``; a frozen residual
  ``-s B0 A0`` keeps the function unchanged at init (see residual.py).
- ``lora-ga-peft``: PEFT 0.21's own LoRA-GA (``LoraGAConfig()`` defaults: ArB2r, ``scale="stable"``, read
  from ``peft/tuners/lora/layer.py::lora_ga_init``): ``A0 = V[:, :r]^T`` (unscaled),
  ``B0 = U[:, r:2r] diag(S[r:2r]) c``, same ``c``; here with LoRA-GA's scaling and residual, so only
  the formula differs from ``lora-ga``.
- ``lora-ga-sign``: the same on ``sign(G)`` (the "speculative" Adam variant of the LoRA-GA blog).
- ``lora-ga-adam``: the blog's "hard-core" Adam variant. Adam's first step moves W by about
  ``-lr sign(G)`` (full fine-tuning) and a LoRA by ``-lr s (B0 sign(B0^T G) + sign(G A0^T) A0)``;
  starting from the LoRA-GA solution, (A0, B0) are optimised (a bounded number of Adam steps on a
  tanh-smoothed sign) to align the second with the first, up to a fitted scalar, and then put back
  to LoRA-GA's norms (the stable scale). Done per module right after its G is ready, inside the
  gradient pass, so the pass's one-block memory bound holds. The start is kept when the exact (sign)
  objective does not improve.
- ``lora-one`` (Zhang et al. 2025): SVD of ``-G``; ``B0 = U_r sqrt(S_r / S_0) / sqrt(gamma)``,
  ``A0 = sqrt(S_r / S_0) V_r^T / sqrt(gamma)``; no offset by default: the function moves by one
  scaled gradient step at init (``residual=True`` keeps it unchanged instead).
- ``gaussian`` / ``kaiming`` (vanilla LoRA, PEFT's own init): ``B = 0``, ``A`` random; no gradient pass.

A module whose gradient is exactly zero (a layer whose output does not reach the loss, an expert no
token of the sample reached) has no direction to start from (LoRA-One would divide by ``S[0] = 0``,
LoRA-GA would take arbitrary singular vectors): it gets vanilla LoRA's start instead (PEFT's kaiming
``A``, ``B = 0``; the residual, if any, is then zero), and is listed in ``qlora_ga_init["vanilla_modules"]``
(and in the gradient pass's report, ``PassReport.zero_gradient_modules``).

Adapters are PEFT's (``LoraConfig`` + ``get_peft_model``); only their starting values are set here.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .constants import DEFAULT_TARGETS, PEFT_PREFIX
from .errors import QloraGaError, did_you_mean
from .estimate import Factors, has_no_gradient, svd_reducer
from .methods import METHODS, method_defaults
from .arch import resolve_targets
from .residual import attach_residual


def lora_ga_factors(f: Factors, rank: int, gamma: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A0, B0)`` of LoRA-GA (ArB2r, stable scale) from the SVD factors of G."""
    m = f.shape[0]
    c = m**0.25 / gamma**0.5
    return f.V[:, :rank].T * c, f.U[:, rank : 2 * rank] * c


def lora_ga_peft_factors(f: Factors, rank: int, gamma: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A0, B0)`` of PEFT 0.21's LoRA-GA (ArB2r, stable scale): A0 unscaled, B0 carries S[r:2r] and c."""
    c = f.shape[0] ** 0.25 / gamma**0.5
    return f.V[:, :rank].T.clone(), f.U[:, rank : 2 * rank] * (f.S[rank : 2 * rank] * c)


def lora_one_factors(f: Factors, rank: int, gamma: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A0, B0)`` of LoRA-One from the SVD factors of G (the SVD of -G is (-U) S V^T)."""
    w = torch.sqrt(f.S[:rank] / f.S[0]) / gamma**0.5
    return w[:, None] * f.V[:, :rank].T, -f.U[:, :rank] * w


ADAM_NEEDS_STARTS = ("init 'lora-ga-adam' computes its start inside the gradient pass: estimate with "
                     "reducer=factor_reducer('lora-ga-adam', rank)")


def lora_ga_adam_factors(f: Factors, rank: int, gamma: float) -> tuple[torch.Tensor, torch.Tensor]:
    """lora-ga-adam's start is optimised against G inside the gradient pass; plain SVD factors cannot give it."""
    raise QloraGaError(ADAM_NEEDS_STARTS)


@dataclass(frozen=True)
class InitMethod:
    """One adapter init method: how its adapters start and what that needs. Its default settings (lr, alpha, gamma,
    rsLoRA) are in :data:`qlora_ga.methods.METHOD_DEFAULTS`, which the command line reads before torch loads."""

    name: str
    start: Callable | None = None  # (A0, B0) from a module's SVD factors; None: PEFT's own random start, no gradient pass
    vectors_per_rank: int = 1  # singular triplets of G one unit of rank uses (LoRA-GA takes U[:, r:2r]: 2)
    transform: Callable | None = None  # what the SVD is taken of (None: G itself)
    residual: bool = False  # by default, a frozen residual keeps the function unchanged at init
    peft_init: str | bool = True  # PEFT's ``init_lora_weights``: the start of a method without ``start``

    @property
    def needs_gradient(self) -> bool:
        return self.start is not None


#: every init method, by name (:func:`init_method`); a name missing here is an error, never another method's start
INITS: dict[str, InitMethod] = {m.name: m for m in (
    InitMethod("lora-ga", lora_ga_factors, vectors_per_rank=2, residual=True),
    InitMethod("lora-one", lora_one_factors),
    InitMethod("gaussian", peft_init="gaussian"),
    InitMethod("kaiming"),
    InitMethod("lora-ga-sign", lora_ga_factors, vectors_per_rank=2, transform=torch.sign, residual=True),
    InitMethod("lora-ga-adam", lora_ga_adam_factors, vectors_per_rank=2, residual=True),  # (its StartFactors as they are)
    InitMethod("lora-ga-peft", lora_ga_peft_factors, vectors_per_rank=2, residual=True),
)}


def init_method(name: str) -> InitMethod:
    """The registry's entry for ``name``; one line naming the known methods for any other."""
    try:
        return INITS[name]
    except KeyError:
        known = f"{did_you_mean(name, tuple(INITS))}: choose one of {', '.join(INITS)}"
        if name in METHODS:  # in the table of defaults, not in the registry
            raise QloraGaError(f"init '{name}' has no entry in the init registry (qlora_ga.init.INITS){known}") from None
        raise QloraGaError(f"unknown init '{name}'{known}") from None


def singular_vectors_needed(method: str, rank: int) -> int:
    """How many singular triplets of G a method uses (LoRA-GA takes U[:, r:2r])."""
    return init_method(method).vectors_per_rank * rank


def svd_transform(method: str):
    """What the SVD is taken of: ``sign(G)`` for lora-ga-sign, G otherwise."""
    return init_method(method).transform


@dataclass
class StartFactors:
    """Adapter starting values computed directly for one module (``lora-ga-adam``), fp32 on CPU."""

    A0: torch.Tensor  # r x n
    B0: torch.Tensor  # m x r
    shape: tuple[int, int]
    grad_norm: float
    objective_start: float  # exact Adam-alignment objective at the LoRA-GA start
    objective_end: float
    svd_seconds: float = 0.0  # time of SVD + optimisation (the report's per-module timing)

    @property
    def S(self) -> torch.Tensor:  # for the init report: none, the factors are not an SVD
        return torch.zeros(0)


def adam_alignment(G: torch.Tensor, A: torch.Tensor, B: torch.Tensor, target: torch.Tensor, tau: float | None = None):
    """``min_lam ||lam (B sgn(B^T G) + sgn(G A^T) A) - sign(G)||^2 / (m n)``; ``sgn`` = sign, or tanh(x / (tau rms x))."""

    def sgn(x):
        if tau is None:
            return torch.sign(x)
        return torch.tanh(x / (tau * x.detach().pow(2).mean().sqrt().clamp_min(1e-30)))

    M = B @ sgn(B.T @ G) + sgn(G @ A.T) @ A
    lam = (M * target).sum() / (M * M).sum().clamp_min(1e-30)
    return ((lam * M - target) ** 2).mean()


def optimise_adam_start(G, A0, B0, steps: int = 100, lr: float = 0.02, tau: float = 0.1):
    """Minimise :func:`adam_alignment` from (A0, B0); return (A, B, objective before, after), norms kept."""
    G = G.float()
    target = torch.sign(G)
    A = A0.to(G.device, torch.float32).clone().requires_grad_(True)
    B = B0.to(G.device, torch.float32).clone().requires_grad_(True)
    opt = torch.optim.Adam([{"params": [A], "lr": lr * float(A0.abs().mean())},
                            {"params": [B], "lr": lr * float(B0.abs().mean())}])
    with torch.enable_grad():
        for _ in range(steps):
            opt.zero_grad(set_to_none=True)
            adam_alignment(G, A, B, target, tau).backward()
            opt.step()
    with torch.no_grad():
        A *= A0.norm() / A.norm()
        B *= B0.norm() / B.norm()
        start = float(adam_alignment(G, A0.to(G.device, torch.float32), B0.to(G.device, torch.float32), target))
        end = float(adam_alignment(G, A, B, target))
    if not end < start:
        return A0, B0, start, start
    return A.detach(), B.detach(), start, end


def factor_reducer(method: str, rank: int, gamma: float | None = None, svd: str = "lowrank", niter: int = 4,
                   adam_steps: int = 100):
    """The per-module step of the gradient pass for an init method (SVD factors, or direct starts)."""
    base = svd_reducer(singular_vectors_needed(method, rank), svd, niter, svd_transform(method))
    if method != "lora-ga-adam":
        return base
    gamma = method_defaults(method)["gamma"] if gamma is None else gamma

    def reduce(name: str, G: torch.Tensor) -> StartFactors:
        t = time.perf_counter()
        f = base(name, G)
        A0, B0 = lora_ga_factors(f, rank, gamma)
        A, B, o0, o1 = optimise_adam_start(G, A0.to(G.device), B0.to(G.device), steps=adam_steps)
        return StartFactors(A.cpu(), B.cpu(), f.shape, f.grad_norm, o0, o1, time.perf_counter() - t)

    return reduce


def lora_layers(model: nn.Module) -> dict[str, nn.Module]:
    """``{base module name: PEFT LoRA layer}`` (names without PEFT's ``base_model.model.`` prefix)."""
    from peft.tuners.lora import LoraLayer

    return {n.removeprefix(PEFT_PREFIX): m for n, m in model.named_modules() if isinstance(m, LoraLayer)}


def init_adapters(
    model: nn.Module,
    factors: dict[str, Factors | StartFactors] | None = None,
    *,
    method: str = "lora-ga",
    rank: int = 8,
    alpha: float = 16.0,
    gamma: float | None = None,
    use_rslora: bool | None = None,
    residual: bool | None = None,
    target_modules: str | Sequence[str] = DEFAULT_TARGETS,
    lora_dropout: float = 0.0,
    residual_dtype: torch.dtype | None = None,
    rank_pattern: dict[str, int] | None = None,
):
    """Wrap ``model`` with PEFT LoRA adapters and set their starting values; return the ``PeftModel``.

    ``factors``: output of :func:`qlora_ga.estimate.estimate_factors` (needed by the gradient
    methods). ``use_rslora`` defaults to True for the gradient methods (s = alpha / sqrt(r)) and False
    for vanilla LoRA (s = alpha / r). ``residual`` defaults to True for lora-ga*, False otherwise.
    ``residual_dtype``: the compute dtype by default (bf16 on GPU, fp32 on CPU).
    ``rank_pattern``: ``{module name: rank}`` for modules whose rank is not ``rank`` (PEFT's own
    ``LoraConfig.rank_pattern``, e.g. from :func:`qlora_ga.ranks.allocate_ranks`).
    """
    from peft import LoraConfig, get_peft_model

    init = init_method(method)  # (before the model is touched)
    if not isinstance(rank, int) or rank <= 0:
        raise QloraGaError(f"--rank must be a positive integer, got {rank}")
    if init.needs_gradient and not factors:
        raise QloraGaError(f"init '{method}' needs the gradient factors: run estimate_factors first")
    if init.start is lora_ga_adam_factors and not all(isinstance(f, StartFactors) for f in factors.values()):
        raise QloraGaError(ADAM_NEEDS_STARTS)
    use_rslora = init.needs_gradient if use_rslora is None else use_rslora
    residual = init.residual if residual is None else residual
    gamma = method_defaults(method)["gamma"] if gamma is None else gamma
    config = LoraConfig(
        r=rank, lora_alpha=alpha, lora_dropout=lora_dropout, target_modules=list(resolve_targets(model, target_modules)),
        use_rslora=use_rslora, bias="none", task_type="CAUSAL_LM", rank_pattern=dict(rank_pattern or {}),
        init_lora_weights=init.peft_init,
    )
    peft_model = get_peft_model(model, config)
    if not init.needs_gradient:
        return peft_model
    vanilla = _set_starts(peft_model, factors, init, gamma, residual, residual_dtype or getattr(model.config, "dtype", None))
    peft_model.qlora_ga_init = {"method": method, "rank": rank, "alpha": alpha, "gamma": gamma,
                                "use_rslora": use_rslora, "residual": residual, "rank_pattern": dict(rank_pattern or {}),
                                "vanilla_modules": vanilla}
    return peft_model


def _set_starts(peft_model, factors: dict, init: InitMethod, gamma: float, residual: bool, compute_dtype) -> list[str]:
    """Each LoRA layer's (A0, B0) from its module's factors, and its residual; returns the modules with a zero
    gradient, which keep PEFT's own (kaiming A, B = 0) start, as --init kaiming."""
    method = init.name
    compute_dtype = compute_dtype or torch.float32
    if isinstance(compute_dtype, str):
        compute_dtype = getattr(torch, compute_dtype)
    layers = lora_layers(peft_model)
    missing = sorted(set(layers) - set(factors))
    if missing:
        raise QloraGaError(f"no gradient factors for {missing[0]} (and {len(missing) - 1} more): estimate with the same --target-modules")
    vanilla = []  # modules with a zero gradient: PEFT's own (kaiming A, B = 0) start, as --init kaiming
    with torch.no_grad():
        for name, layer in layers.items():
            f = factors[name]
            r = layer.r["default"]
            if not isinstance(f, StartFactors) and f.U.shape[1] < singular_vectors_needed(method, r):
                raise QloraGaError(f"{name} has rank {r} but only {f.U.shape[1]} singular vectors were kept: "
                                   "estimate with n_vectors >= singular_vectors_needed(method, its rank)")
            if isinstance(f, StartFactors) and tuple(f.A0.shape) != (r, f.shape[1]):
                raise QloraGaError(f"{name}: the {method} start has rank {f.A0.shape[0]}, the adapter {r}")
            lora_A, lora_B = layer.lora_A["default"], layer.lora_B["default"]
            if has_no_gradient(f):
                vanilla.append(name)  # (A, B) stay as PEFT made them
            else:
                A0, B0 = (f.A0, f.B0) if isinstance(f, StartFactors) else init.start(f, r, gamma)
                if not (torch.isfinite(A0).all() and torch.isfinite(B0).all()):
                    raise QloraGaError(f"the {method} start of {name} is not finite (gradient norm {f.grad_norm:.3g}): "
                                       "check the data and the model weights, or use --init kaiming")
                lora_A.weight.copy_(A0.to(lora_A.weight.device, lora_A.weight.dtype))
                lora_B.weight.copy_(B0.to(lora_B.weight.device, lora_B.weight.dtype))
            if residual:
                # the frozen copy is made from the very values the adapter starts from (rounded to the
                # compute dtype, as autocast rounds them), so the branch is exactly zero at init
                attach_residual(layer, lora_A.weight, lora_B.weight, dtype=compute_dtype)
    return vanilla
