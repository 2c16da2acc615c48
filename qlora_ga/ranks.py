"""Per-module LoRA ranks chosen from the gradient pass (``--rank-allocation gradient``).

The pass gives every target module's gradient spectrum ``sigma_1 >= sigma_2 >= ...`` (the SVD the
inits take anyway). Giving module i a rank k costs ``k (m_i + n_i)`` trainable parameters, and its
k-th singular direction carries ``sigma_{i,k}^2`` of the gradient's energy (the first-order loss
decrease a Frobenius-bounded step in that direction buys). The allocation spends the budget of
uniform rank r, ``r * sum_i (m_i + n_i)``, greedily on the directions with the most energy per
parameter, ``sigma_{i,k}^2 / (m_i + n_i)``, with every module kept in ``[r_min, r_max]``
(defaults ``max(1, r // 2)`` and ``2 r``). Because each module's sigmas decrease, the greedy choice
takes a prefix of every module's directions, so a module's rank is simply how many it got. The
total never exceeds the uniform budget; what is left over is less than one more direction costs.

How it keeps the pass's one-block memory bound: nothing changes inside the pass except how many
singular triplets are kept per module (``singular_vectors_needed(method, r_max)`` instead of the
uniform rank's); G itself is still freed block by block. The ranks are decided at the end, from
the kept singular values, and the inits take the first ``r_i`` (LoRA-One) or ``2 r_i`` (LoRA-GA)
of the kept vectors, so a LoRA-GA init stays exact through the residual at any rank.

The ranks reach PEFT as ``LoraConfig.rank_pattern`` (alpha unchanged: rsLoRA scales each module by
``alpha / sqrt(r_i)``), so the exported adapter reloads in vanilla PEFT; a checkpoint's ranks are
read back from its weights' shapes (:func:`ranks_from_state_dict`).
"""

from __future__ import annotations

import re

from .constants import PEFT_PREFIX
from .errors import QloraGaError

# inits whose per-module step is not a plain SVD (sign(G)'s spectrum, or an optimised start at one rank)
UNSUPPORTED = ("lora-ga-sign", "lora-ga-adam")


def rank_bounds(rank: int) -> tuple[int, int]:
    """``(r_min, r_max)`` of the gradient allocation for a uniform rank ``rank``."""
    return max(1, rank // 2), 2 * rank


def allocate_ranks(factors: dict, rank: int, method: str = "lora-ga", r_min: int | None = None,
                   r_max: int | None = None) -> dict[str, int]:
    """``{module: rank}`` with ``sum r_i (m_i + n_i) <= rank * sum (m_i + n_i)`` (see the module docstring).

    ``factors``: ``{module: Factors}`` from the gradient pass, each with at least
    ``singular_vectors_needed(method, r_max)`` triplets (fewer where the matrix is smaller).
    """
    from .init import singular_vectors_needed

    if method in UNSUPPORTED:
        raise QloraGaError(f"rank allocation 'gradient' does not support init {method}: use --rank-allocation uniform")
    lo, hi = rank_bounds(rank)
    lo, hi = lo if r_min is None else r_min, hi if r_max is None else r_max
    if not 1 <= lo <= rank <= hi:
        raise QloraGaError(f"rank bounds must satisfy 1 <= r_min <= rank <= r_max, got {lo}, {rank}, {hi}")
    per_rank = singular_vectors_needed(method, 1)  # singular vectors one rank uses (2 for LoRA-GA)
    cost = {n: f.shape[0] + f.shape[1] for n, f in factors.items()}
    top = {}
    for n, f in factors.items():
        top[n] = min(hi, len(f.S) // per_rank)
        if top[n] < lo:
            raise QloraGaError(f"{n}: only {len(f.S)} singular values were kept, rank {lo} needs {lo * per_rank}")
    budget = rank * sum(cost.values()) - lo * sum(cost.values())
    ranks = dict.fromkeys(factors, lo)
    # the k-th rank of module n is worth sigma_k^2 per parameter it costs; ties broken by name, then k
    candidates = sorted(((float(f.S[k - 1]) ** 2 / cost[n], n, k) for n, f in factors.items()
                         for k in range(lo + 1, top[n] + 1)), key=lambda t: (-t[0], t[1], t[2]))
    for _, n, k in candidates:
        if k == ranks[n] + 1 and cost[n] <= budget:
            ranks[n] = k
            budget -= cost[n]
    return ranks


def trainable_count(ranks: dict[str, int], shapes: dict[str, tuple[int, int]]) -> int:
    """LoRA parameters ``sum r_i (m_i + n_i)``."""
    return sum(r * (shapes[n][0] + shapes[n][1]) for n, r in ranks.items())


def rank_pattern(ranks: dict[str, int], rank: int) -> dict[str, int]:
    """PEFT ``rank_pattern`` (exact module names) for the modules whose rank is not ``rank``."""
    return {n: r for n, r in sorted(ranks.items()) if r != rank}


_LORA_A = re.compile(rf"^(?:{re.escape(PEFT_PREFIX)})?(?P<module>.+)\.lora_A(?:\.[^.]+)?\.weight$")


def ranks_from_state_dict(sd: dict) -> dict[str, tuple[int, int, int]]:
    """``{module: (rank, m, n)}`` from a PEFT adapter state dict (``lora_A.weight`` is r x n, ``lora_B`` m x r)."""
    out = {}
    for key, t in sd.items():
        m = _LORA_A.match(key)
        if m:
            b = sd.get(key.replace(".lora_A", ".lora_B"))
            out[m.group("module")] = (int(t.shape[0]), int(b.shape[0]) if b is not None else 0, int(t.shape[1]))
    return out


def checkpoint_rank_pattern(sd: dict, rank: int, allocation: str) -> dict[str, int]:
    """The ``rank_pattern`` a checkpoint's weights were trained with, checked against the settings.

    ``uniform``: none (a checkpoint of another rank then fails to load, a clear error upstream).
    ``gradient``: every module's rank from its weights, which must be a gradient allocation of
    ``rank`` (inside its bounds, within its budget); anything else raises :class:`QloraGaError`.
    """
    if allocation != "gradient":
        return {}
    found = ranks_from_state_dict(sd)
    lo, hi = rank_bounds(rank)
    used = sum(r * (m + n) for r, m, n in found.values())
    budget = rank * sum(m + n for _, m, n in found.values())
    if not found or any(not lo <= r <= hi for r, _, _ in found.values()) or used > budget:
        raise QloraGaError(f"the checkpoint's ranks are not a gradient allocation of rank {rank}: "
                           "resume with the run's own settings (its run_config.yaml)")
    return rank_pattern({k: r for k, (r, _, _) in found.items()}, rank)
