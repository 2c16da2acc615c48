"""The truncated SVD of each module's gradient (the inits' factors), and the rank check."""

from __future__ import annotations

import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..arch import target_linears
from ..errors import QloraGaError


@dataclass
class Factors:
    """Truncated SVD ``G ~= U diag(S) V^T`` of one module's gradient (fp32, CPU)."""

    U: torch.Tensor  # m x k
    S: torch.Tensor  # k
    V: torch.Tensor  # n x k
    shape: tuple[int, int]
    grad_norm: float  # ||G||_F
    svd_seconds: float = 0.0


def has_no_gradient(f) -> bool:
    """Whether a reduced module's gradient was exactly zero (``Factors`` or a start with ``grad_norm``): no direction."""
    S = getattr(f, "S", None)
    return f.grad_norm == 0 or (S is not None and S.numel() > 0 and float(S[0]) == 0)


def truncated_svd(G: torch.Tensor, k: int, method: str = "lowrank", niter: int = 4,
                  q: int | None = None) -> tuple[torch.Tensor, ...]:
    """Top-``k`` singular triplets of ``G``: ``(U[:, :k], S[:k], V[:, :k])``.

    ``lowrank``: ``torch.svd_lowrank`` with ``q = min(2k, m, n)`` (= 4r for the 2r vectors LoRA-GA
    needs; ``q`` overrides the 2k, for benchmarks/bench_svd.py) and ``niter`` power iterations; ``exact``:
    full ``torch.linalg.svd``.

    Signs are canonical: each left singular vector's largest entry (in absolute value) is positive,
    its right vector flipped with it. LoRA-GA pairs u_(r+i) with v_i, so its start would otherwise
    depend on the sign a solver happens to pick (a tiny change in G, e.g. another summation order
    over processes, can flip one).
    """
    m, n = G.shape
    if method == "exact" or min(m, n) <= 2 * k:
        U, S, Vh = torch.linalg.svd(G, full_matrices=False)
        U, S, V = U[:, :k], S[:k], Vh[:k].T
    elif method == "lowrank":
        U, S, V = torch.svd_lowrank(G, q=min(q or 2 * k, m, n), niter=niter)
        U, S, V = U[:, :k], S[:k], V[:, :k]
    else:
        raise QloraGaError(f"unknown SVD method '{method}': use 'lowrank' or 'exact'")
    sign = torch.sign(U.gather(0, U.abs().argmax(0, keepdim=True)))
    sign[sign == 0] = 1
    return U * sign, S, V * sign


def svd_reducer(k: int, method: str = "lowrank", niter: int = 4, transform: Callable | None = None):
    """``reduce_fn`` for :func:`gradient_pass` that keeps the top-``k`` SVD factors of each G (on CPU).

    The randomized SVD draws from a generator seeded by the module's name, so a module's factors
    depend on its G alone (not on which process reduces it, or on what ran before).
    """

    def reduce(name: str, G: torch.Tensor) -> Factors:
        t = time.perf_counter()
        norm = float(torch.linalg.matrix_norm(G))
        target = transform(G) if transform is not None else G
        with torch.random.fork_rng(devices=[G.device] if G.device.type == "cuda" else []):
            torch.manual_seed(zlib.crc32(name.encode()))
            U, S, V = truncated_svd(target, k, method, niter)
        return Factors(U.cpu(), S.cpu(), V.cpu(), tuple(G.shape), norm, time.perf_counter() - t)

    return reduce


def check_rank(model: nn.Module, rank: int, target_modules: Sequence[str], needed: int | None = None):
    """Raise a clear error for a rank that is <= 0 or larger than a target layer allows."""
    if not isinstance(rank, int) or rank <= 0:
        raise QloraGaError(f"--rank must be a positive integer, got {rank}")
    needed = needed or rank
    linears = target_linears(model, target_modules)
    if not linears:
        raise QloraGaError(f"no target linears named {list(target_modules)} in the model: check --target-modules")
    name, smallest = min(linears.items(), key=lambda kv: min(kv[1].out_features, kv[1].in_features))
    limit = min(smallest.out_features, smallest.in_features)
    if needed > limit:
        what = f"rank {rank}" if needed == rank else f"rank {rank} (this init needs {needed} singular vectors)"
        raise QloraGaError(
            f"{what} is too large for {name} ({smallest.out_features} x {smallest.in_features}, at most {limit}): lower --rank"
        )
