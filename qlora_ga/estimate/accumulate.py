"""Each target linear's fp32 gradient G: the buffers (counted, for the pass's report) and the forward hooks that
add delta^T x to them as the block's backward reaches each linear."""

from __future__ import annotations

import weakref

import torch


class GradLedger:
    """Counts the bytes of live gradient buffers (freed ones leave via weakref.finalize)."""

    def __init__(self):
        self.live = 0
        self.peak = 0

    def new(self, shape, device) -> torch.Tensor:
        g = torch.zeros(shape, dtype=torch.float32, device=device)
        nbytes = g.numel() * 4
        self.live += nbytes
        self.peak = max(self.peak, self.live)
        weakref.finalize(g, self._free, nbytes)
        return g

    def _free(self, nbytes):
        self.live -= nbytes


def new_grad_buffer(ledger: GradLedger, shape, device) -> torch.Tensor:
    """Allocate one module's fp32 gradient accumulator (a seam the tests instrument)."""
    return ledger.new(shape, device)


#: CUDA: 16-bit x^T delta products computed by the GEMM itself in fp32 (``torch.mm(..., out_dtype=float32)``); set
#: False the first time that raises (an older torch or GPU), then the inputs are cast to fp32 as on the CPU
_MM_OUT_FP32 = True


def add_product(G: torch.Tensor, delta: torch.Tensor, x: torch.Tensor):
    """G += delta^T x in fp32. 16-bit CUDA inputs go through one tensor-core GEMM that accumulates in fp32 and writes
    fp32 (the exact products of the same 16-bit values, summed in fp32, as after casting; without the casts'
    copies and at 16-bit GEMM speed instead of fp32's, which is ~10x slower on an H100); anything else: cast, addmm."""
    global _MM_OUT_FP32
    if _MM_OUT_FP32 and delta.is_cuda and delta.dtype in (torch.bfloat16, torch.float16) and x.dtype == delta.dtype:
        try:
            G.add_(torch.mm(delta.T, x, out_dtype=torch.float32))
            return
        except (RuntimeError, TypeError):
            _MM_OUT_FP32 = False
    G.addmm_(delta.float().T, x.float())


def accumulate_hook(G: torch.Tensor):
    """Forward hook on a target linear: when its output's gradient delta arrives, G += delta^T x."""

    def hook(module, args, output):
        x = args[0].detach()

        def on_grad(delta):
            add_product(G, delta.reshape(-1, delta.shape[-1]), x.reshape(-1, x.shape[-1]))

        if output.requires_grad:
            output.register_hook(on_grad)

    return hook
