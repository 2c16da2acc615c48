"""The training step's settings (:class:`TrainSettings`, filled from the run's options by ``config.settings_for``).

Its fields are the options of :class:`~qlora_ga.config.FinetuneConfig` declared with ``steps=("train", ...)`` (their
defaults and help are there: one declaration per option), plus the step's own fields below.
"""

from __future__ import annotations

from dataclasses import field

from ..config import step_settings

TrainSettings = step_settings("TrainSettings", "train", __name__, __doc__, own=[
    ("lr", "float", field(default=5e-5)),  # the peak lr as a number ('auto' and the method default are resolved before)
    ("gradient_checkpointing", "bool", field(default=True)),  # from --no_gradient_checkpointing
    ("precond_lambda", "float", field(default=1e-6)),  # --optim lora-one-precond's damping
    ("num_workers", "int | None", field(default=None)),  # DataLoader workers; None: 2 on CUDA, 0 (main process) elsewhere
])
