"""What the training step runs under: gradient checkpointing (transformers' switch), data parallelism over the
adapters, and the peak-memory reading of the metrics."""

from __future__ import annotations

import contextlib

import torch


def checkpointing(model, on: bool):
    """Gradient (activation) checkpointing through transformers' own switch (renamed in v5)."""
    name = "activation_checkpointing" if hasattr(model, "activation_checkpointing_enable") else "gradient_checkpointing"
    if on:
        getattr(model, f"{name}_enable")(**{f"{name}_kwargs": {"use_reentrant": False}})
    else:
        getattr(model, f"{name}_disable")()


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return round(torch.cuda.max_memory_allocated(device) / 2**30, 3)  # GiB
    try:
        import resource

        return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)  # GiB (ru_maxrss is KiB on Linux)
    except ImportError:  # pragma: no cover
        return float("nan")


def data_parallel(model, device: torch.device):
    """The model in ``DistributedDataParallel`` over its trainable parameters (the adapters) only."""
    from torch.nn.parallel import DistributedDataParallel

    frozen = [n for n, p in model.named_parameters() if not p.requires_grad] + [n for n, _ in model.named_buffers()]
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, frozen)  # no 4-bit weights on the wire
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                   broadcast_buffers=False)


def no_sync(step_model, skip: bool):
    """``DistributedDataParallel.no_sync()`` where ``skip`` (a non-final micro-batch), else nothing."""
    return step_model.no_sync() if skip and hasattr(step_model, "no_sync") else contextlib.nullcontext()
