"""What the benchmark scripts record about the machine they ran on."""

from __future__ import annotations

import os
import platform

import torch


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("torch", "bitsandbytes", "transformers", "peft"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:  # pragma: no cover
            out[name] = None
    return out


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def quiet():
    """The library chatter the package's scripts silence, plus UserWarnings (benchmarks print tables)."""
    import warnings

    from qlora_ga.log import quiet_libraries

    quiet_libraries()
    warnings.filterwarnings("ignore", category=UserWarning)
