"""The adapter init methods and their default settings, in one table.

Torch-free on purpose: ``config.py`` reads it to parse and check the settings before anything heavy
loads. The formulas of the methods are in ``init.py`` (docs/DESIGN.md section 3).
"""

from __future__ import annotations

from typing import Any

from .errors import QloraGaError, did_you_mean

# ---------------------------------------------------------------------------------------------
# Per-method defaults. They come from the evidence in DESIGN section 7 (SmolLM2-135M on GSM8K,
# r=8, 300 steps) and docs/RESULTS.md (same model, 4-bit, 50 steps, lr grids bracketed, 2 seeds),
# and from the methods' papers / reference code. Rule: the best lr of the longest measured run
# (300 steps); the 50-step runs put every method's optimum about 2x higher (short runs favour
# larger lrs) and larger models usually want smaller ones, so the defaults stay on the low side.
# Every convergence claim must be made against vanilla LoRA with a tuned lr.
#   lora-ga : LoRA-GA paper setting (gamma 16, rsLoRA scaling alpha/sqrt(r), alpha 16); in DESIGN
#             section 7 lr 5e-5 was best of 2e-5 / 5e-5 / 2e-4 (LoRA-GA wants a much smaller lr
#             than vanilla LoRA).
#   lora-one: gamma 128 as in DESIGN section 7 (the LoRA-One README example uses 64), rsLoRA
#             scaling with alpha 16 as in the LoRA-One reference code; lr 5e-4 was best of
#             2e-4 / 5e-4 at 300 steps (at 50 steps: 2e-4 / 5e-4 / 1e-3 / 2e-3, see RESULTS.md).
#   gaussian / kaiming (vanilla LoRA, B = 0): lr 1e-3 was best of 2e-4 / 5e-4 / 1e-3; classic
#             alpha/r scaling; no gamma (no gradient pass).
#   lora-ga-sign / lora-ga-adam: LoRA-GA's Adam variants (blog: 'speculative' / 'hard-core'), gamma and
#             alpha as lora-ga; no 300-step run, so lr = half their 50-step optimum (RESULTS.md section 5:
#             seed 0, sign 1e-4 / 2e-4 / 4e-4 -> 0.923 / 0.909 / 0.915, adam 1e-4 / 2e-4 / 4e-4 -> 0.920 / 0.915 /
#             0.942; over 2 seeds adam's 1e-4 and 2e-4 tie, 0.917 / 0.919):
#             1e-4, twice lora-ga's (sign(G) and the Adam objective give factors that want a larger step).
#   lora-ga-peft: PEFT 0.21's LoRA-GA formula (B0 carries S[r:2r], A0 unscaled), gamma / alpha as lora-ga.
#             Its B0 is ~S times smaller than lora-ga's, so the start is close to vanilla LoRA's (B ~ 0) with
#             A along the gradient's top right singular vectors: lr as vanilla LoRA's default, 1e-3 (see
#             RESULTS.md section 8 for what was measured).
# ---------------------------------------------------------------------------------------------
METHOD_DEFAULTS: dict[str, dict[str, Any]] = {
    "lora-ga": dict(lr=5e-5, alpha=16.0, gamma=16.0, use_rslora=True),
    "lora-one": dict(lr=5e-4, alpha=16.0, gamma=128.0, use_rslora=True),
    "gaussian": dict(lr=1e-3, alpha=16.0, gamma=None, use_rslora=False),
    "kaiming": dict(lr=1e-3, alpha=16.0, gamma=None, use_rslora=False),
    "lora-ga-sign": dict(lr=1e-4, alpha=16.0, gamma=16.0, use_rslora=True),
    "lora-ga-adam": dict(lr=1e-4, alpha=16.0, gamma=16.0, use_rslora=True),
    "lora-ga-peft": dict(lr=1e-3, alpha=16.0, gamma=16.0, use_rslora=True),
}

METHODS = tuple(METHOD_DEFAULTS)
#: the methods that need the gradient pass (those with a gamma)
GRADIENT_METHODS = tuple(m for m, d in METHOD_DEFAULTS.items() if d["gamma"] is not None)


def default_lrs_text() -> str:
    """The default lr of every method, as ``--help`` and the README state it: ``lora-ga 5e-5, lora-one 5e-4, ...``."""
    by_lr: dict[float, list[str]] = {}
    for m, d in METHOD_DEFAULTS.items():
        by_lr.setdefault(d["lr"], []).append(m)
    return ", ".join(f"{'/'.join(ms)} {_short(lr)}" for lr, ms in by_lr.items())


def _short(x: float) -> str:
    """``5e-05`` -> ``5e-5``, ``0.00025`` -> ``2.5e-4``."""
    mantissa, exponent = f"{x:e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"


def method_defaults(init: str) -> dict[str, Any]:
    """``dict(lr=..., alpha=..., gamma=..., use_rslora=...)`` for the init method ``init`` (a copy)."""
    if init not in METHOD_DEFAULTS:
        raise QloraGaError(f"init '{init}' is not known{did_you_mean(init, METHODS)}: use one of {', '.join(METHODS)}")
    return dict(METHOD_DEFAULTS[init])
