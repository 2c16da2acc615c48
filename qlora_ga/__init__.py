"""qlora-ga: LoRA-GA / LoRA-One adapters on a 4-bit base, from a block-bounded gradient pass.

Pipeline: :func:`load_model` -> :func:`estimate_factors` -> :func:`init_adapters` -> train -> export.

The names below are imported on first use (PEP 562), so that ``qlora_ga.config`` and the command
lines can check their arguments before torch and bitsandbytes load (seconds, and library chatter).
"""

from .errors import QloraGaError

_LAZY = {"Factors": "estimate", "PassReport": "estimate", "estimate_factors": "estimate", "gradient_pass": "estimate",
         "init_adapters": "init", "load_model": "model"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:  # the lazy names too (tab completion, help())
    return sorted(set(globals()) | set(_LAZY))


__all__ = ["QloraGaError", "Factors", "PassReport", "estimate_factors", "gradient_pass", "init_adapters", "load_model"]
__version__ = "0.1.0"
