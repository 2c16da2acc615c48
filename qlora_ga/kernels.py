"""Optional fused kernels for the training step: Liger Kernel (``--liger``, CUDA only, off by default).

Liger Kernel (the maintained ``liger-kernel`` package) swaps in Triton kernels for RMSNorm, RoPE and
SwiGLU, and a fused linear cross-entropy that never materializes the ``[tokens, vocab]`` logits
during training (in eval mode the model still returns logits). It patches the model instance by its
``model_type`` (Llama, Mistral, Qwen2, Gemma, ...); RoPE is patched in the transformers module, so
every model of that family in the process gets it. The 4-bit linears and their LoRA layers are
untouched (Liger's SwiGLU calls them as before), so the residual, the export and the merges are
unchanged. Not a default dependency (it needs Triton and a CUDA torch): ``pip install 'qlora-ga[liger]'``.
"""

from __future__ import annotations

import inspect

import torch

from .errors import QloraGaError

LIGER_INSTALL = "pip install 'qlora-ga[liger]' (or pip install liger-kernel)"
LIGER_KERNELS = dict(rope=True, rms_norm=True, swiglu=True, fused_linear_cross_entropy=True, cross_entropy=False)


def check_liger(device) -> None:
    """Raise a one-line :class:`QloraGaError` where Liger Kernel cannot run (no CUDA, not installed)."""
    device = torch.device(device)
    if device.type != "cuda":
        raise QloraGaError(f"--liger needs a CUDA GPU (Liger Kernel's kernels are Triton kernels), but the device is "
                           f"{device.type}: leave --liger out, or run on a GPU")
    try:
        import liger_kernel.transformers  # noqa: F401
    except ImportError:
        raise QloraGaError(f"--liger needs the liger-kernel package, which is not installed: {LIGER_INSTALL}") from None


def apply_liger(model, device) -> str:
    """Patch ``model`` (a transformers model, or a PEFT model around one) with Liger's kernels; return its model type."""
    check_liger(device)
    from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN

    from .arch import unwrap

    base = unwrap(model)
    model_type = getattr(base.config, "model_type", None)
    fn = MODEL_TYPE_TO_APPLY_LIGER_FN.get(model_type)
    if fn is None:
        raise QloraGaError(f"--liger: Liger Kernel has no kernels for model type '{model_type}': leave --liger out")
    params = inspect.signature(fn).parameters
    fn(model=base, **{k: v for k, v in LIGER_KERNELS.items() if k in params})
    return model_type
