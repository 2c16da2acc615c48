#!/usr/bin/env python
"""Fine-tune a causal LM with LoRA-GA / LoRA-One / LoRA adapters on a 4-bit base.

    python scripts/finetune.py                                   # built-in demo (offline, CPU ok)
    python scripts/finetune.py --model meta-llama/Llama-2-7b-hf --rank 8 --dataset data.jsonl
    python scripts/finetune.py --config configs/llama2-7b-24gb.yaml --lr 1e-4

All options: --help. The steps run in qlora_ga/finetune.py (the command itself: qlora_ga/cli.py, also `qlora-ga finetune`).
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from qlora_ga.cli import finetune  # noqa: E402

if __name__ == "__main__":
    sys.exit(finetune())
