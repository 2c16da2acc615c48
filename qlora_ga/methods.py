"""The adapter init methods and their default settings, in one table.

Torch-free on purpose: ``qlora_ga.config`` reads it to parse and check the settings before anything heavy
loads. The formulas of the methods are in ``init.py``'s registry (``INITS``; docs/DESIGN.md section 3); a test
keeps the two tables naming the same methods.
"""

from __future__ import annotations

from typing import Any

from .errors import QloraGaError, did_you_mean

# Per-method defaults. The evidence for every value (runs, papers, and the rule "the best lr of the
# longest measured run") is in docs/RESULTS.md section 10; the earlier 300-step study it cites is in
# docs/DESIGN.md section 7.
METHOD_DEFAULTS: dict[str, dict[str, Any]] = {
    "lora-ga": dict(lr=5e-5, alpha=16.0, gamma=16.0, use_rslora=True),  # lr: 300-step study; gamma, alpha: LoRA-GA paper
    "lora-one": dict(lr=5e-4, alpha=16.0, gamma=128.0, use_rslora=True),  # lr, gamma: 300-step study; alpha: LoRA-One code
    "gaussian": dict(lr=1e-3, alpha=16.0, gamma=None, use_rslora=False),  # lr: 300-step study; classic alpha/r
    "kaiming": dict(lr=1e-3, alpha=16.0, gamma=None, use_rslora=False),  # as gaussian
    "lora-ga-sign": dict(lr=1e-4, alpha=16.0, gamma=16.0, use_rslora=True),  # lr: half its 50-step optimum
    "lora-ga-adam": dict(lr=1e-4, alpha=16.0, gamma=16.0, use_rslora=True),  # lr: half its 50-step optimum
    "lora-ga-peft": dict(lr=1e-4, alpha=16.0, gamma=16.0, use_rslora=True),  # lr: under half its unbracketed 50-step best
}

#: The inits whose lr, when ``--lr`` is left out, is ``--lr auto``'s (with the Adam optimizers its line search follows):
#: those for which it ended ahead of the fixed lr above and within 0.01 held-out loss of the best tuned lr in every
#: setting measured (docs/RESULTS.md section 8.4). Their fixed ``lr`` is where the search starts, and their lr with
#: the other optimizers.
AUTO_LR_DEFAULT = ("lora-ga",)

METHODS = tuple(METHOD_DEFAULTS)
#: the methods that need the gradient pass (those with a gamma)
GRADIENT_METHODS = tuple(m for m, d in METHOD_DEFAULTS.items() if d["gamma"] is not None)


def default_lrs_text() -> str:
    """The default lr of every method, as ``--help`` and the README state it: ``lora-ga auto, lora-one 5e-4, ...``."""
    by_lr: dict[str, list[str]] = {}
    for m, d in METHOD_DEFAULTS.items():
        by_lr.setdefault("auto" if m in AUTO_LR_DEFAULT else _short(d["lr"]), []).append(m)
    return ", ".join(f"{'/'.join(ms)} {lr}" for lr, ms in by_lr.items())


def fixed_lrs_text(inits) -> str:
    """The fixed lr of each of ``inits``: ``lora-ga 5e-5``."""
    return ", ".join(f"{m} {_short(METHOD_DEFAULTS[m]['lr'])}" for m in inits)


def _short(x: float) -> str:
    """``5e-05`` -> ``5e-5``, ``0.00025`` -> ``2.5e-4``."""
    mantissa, exponent = f"{x:e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"


def method_defaults(init: str) -> dict[str, Any]:
    """``dict(lr=..., alpha=..., gamma=..., use_rslora=...)`` for the init method ``init`` (a copy)."""
    if init not in METHOD_DEFAULTS:
        raise QloraGaError(f"init '{init}' is not known{did_you_mean(init, METHODS)}: use one of {', '.join(METHODS)}")
    return dict(METHOD_DEFAULTS[init])
