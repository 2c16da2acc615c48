"""Step 4 of the pipeline: adapter training (docs/DESIGN.md section 5).

- :mod:`.loop`: :func:`train`, the loop itself;
- :class:`TrainSettings` (declared with the run's options in :mod:`qlora_ga.config`);
- :mod:`.order`: which sequences each step trains on (a pure function of data, seed and step) and the run's length;
- :mod:`.optim`: the optimizers;
- :mod:`.checkpoint`: atomic checkpoints, verified and resumed exactly;
- :mod:`.runtime`: gradient checkpointing, data parallelism, peak memory;
- :mod:`.autolr`: ``--lr auto``, the learning rate from a line search along Adam's first step.
"""

from .autolr import find_lr
from .checkpoint import (CHECKPOINTS, checkpoint_adapter_file, checkpoint_folders, find_checkpoint,
                         load_checkpoint_weights, read_trainer_state, save_checkpoint)
from .loop import NonFiniteLoss, accumulate_gradients, padding_free_decision, step_item, train
from .optim import build_optimizer, precondition_lora_grads, trainable_parameters
from .order import (LENGTH_GROUP_MICRO_BATCHES, StepBatches, epoch_order, micro_batches_for_step, step_loader,
                    total_steps, warmup_steps)
from .runtime import checkpointing
from ..config import TrainSettings

__all__ = ["CHECKPOINTS", "LENGTH_GROUP_MICRO_BATCHES", "NonFiniteLoss", "StepBatches", "TrainSettings", "accumulate_gradients",
           "build_optimizer", "step_item",
           "checkpoint_adapter_file", "checkpoint_folders", "checkpointing", "epoch_order", "find_checkpoint", "find_lr",
           "load_checkpoint_weights", "micro_batches_for_step", "padding_free_decision", "precondition_lora_grads",
           "read_trainer_state", "save_checkpoint", "step_loader", "total_steps", "train", "trainable_parameters",
           "warmup_steps"]
