"""Run by tests/test_distributed.py under torchrun: the CLI, where process 1 fails in its second optimizer step."""

import os
import sys

import torch

from qlora_ga.cli import main

if os.environ.get("RANK") == "1":
    clip = torch.nn.utils.clip_grad_norm_
    calls = []

    def failing_clip(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("CUDA out of memory (simulated on process 1)")
        return clip(*args, **kwargs)

    torch.nn.utils.clip_grad_norm_ = failing_clip

sys.exit(main(sys.argv[1:]))
