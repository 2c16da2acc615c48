"""What the gradient pass reports (``init_report.json``): the sample, the state store's plan and cost, memory peaks,
time, and per module its gradient norm and top singular values."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class PassReport:
    n_sequences: int = 0
    n_label_tokens: int = 0
    n_padded_tokens: int = 0
    n_blocks: int = 0
    loss: float = float("nan")
    seconds: float = 0.0
    state_device: str = ""
    state_stride: int = 1
    state_bytes_per_layer: int = 0
    state_fixed_bytes: int = 0  # kept keyword arguments of the layers (masks, position embeddings), estimated
    reserve_bytes: int = 0  # compute-device memory kept free for the block backward and the loss head
    train_floor_bytes: int = 0  # what a training step at the pass's largest micro-batch needs above the model, at least
    recomputed_blocks: int = 0  # block forwards run once more because the store keeps every k-th layer only
    store_copy_bytes: int = 0  # bytes between the compute device and a store elsewhere (pinned host memory)
    state_buffers: int = 0  # store buffers allocated (each reused once what it held is done)
    peak_live_grad_bytes: int = 0
    max_block_grad_bytes: int = 0
    peak_gpu_bytes: int | None = None
    peak_host_rss_bytes: int | None = None  # the process's peak RSS so far (includes the model itself)
    modules: dict = field(default_factory=dict)  # name -> {"shape", "grad_norm", "top_singular_values", "svd_seconds"}
    # modules whose gradient is exactly zero (nothing of the sample reached them; the inits start them as vanilla LoRA)
    zero_gradient_modules: list = field(default_factory=list)
