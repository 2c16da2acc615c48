"""The training step's settings (filled from the run's ``FinetuneConfig`` by ``config.settings_for``)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class TrainSettings:
    batch_size: int = 4
    grad_accum: int = 4
    lr: float = 5e-5
    epochs: float = 1.0
    max_steps: int = -1
    warmup: float = 0.03
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    optim: str = "paged_adamw_32bit"
    seed: int = 0
    eval_every: int = 0
    save_every: int = 0
    log_every: int = 1
    gradient_checkpointing: bool = True
    precond_lambda: float = 1e-6
    group_by_length: bool = False
    num_workers: int | None = None  # DataLoader workers; None: 2 on CUDA, 0 (main process) elsewhere
    save_total_limit: int | None = None  # keep only the newest N checkpoints; None: all
    padding_free: bool = True  # micro-batches flattened into one row (position_ids restart per sequence) where the model supports it
    packing: bool = False  # whole sequences packed into rows of max_length tokens (best-fit decreasing); batch_size counts rows
    max_length: int = 512  # packing: tokens per row
    compile: bool = False  # torch.compile each decoder block (qlora_ga.compile)
    fused_lora: bool = False  # each 4-bit LoRA linear as one autograd Function (qlora_ga.fused)
