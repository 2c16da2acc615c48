"""The ``qlora-ga`` command: ``qlora-ga finetune | export | evaluate`` (no subcommand: finetune); the scripts
``scripts/finetune.py``, ``export.py`` and ``evaluate.py`` run the same three.

Every user mistake ends with one line on stderr and exit code 2 (no traceback); under a launcher
(torchrun, accelerate launch) the main process says it and every process leaves.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from dataclasses import replace

from .config import FinetuneConfig, parse_config
from .errors import QloraGaError
from .finetune import run
from .log import distributed, quiet_libraries

#: ``qlora-ga SUBCOMMAND ...``; ``qlora-ga`` followed by options, or by nothing (the demo), is ``finetune``
COMMANDS = ("finetune", "export", "evaluate")

# The built-in demo (no --model, no --dataset, no --config): sized to finish in a few minutes on a
# 2-core CPU. Applied only to options left at their defaults; see configs/default.yaml.
DEMO_PRESET = dict(max_length=256, batch_size=4, grad_accum=2, max_steps=24, init_samples=32, eval_split="0.05",
                   output_dir="outputs/demo", no_gradient_checkpointing=True, sample_prompts=1)


def apply_demo_preset(cfg: FinetuneConfig) -> FinetuneConfig:
    if cfg.model is not None or cfg.dataset is not None or cfg.config is not None:
        return cfg
    defaults = FinetuneConfig()
    changes = {k: v for k, v in DEMO_PRESET.items() if getattr(cfg, k) == getattr(defaults, k)}
    return replace(cfg, **changes)


LAUNCHED_ERROR_GRACE_S = 3.0


def main(argv: list[str] | None = None) -> int:
    """``qlora-ga [finetune | export | evaluate] ARGS``: the subcommand's exit code (no subcommand: finetune)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv[0] if argv and argv[0] in COMMANDS else "finetune"
    args = argv[1:] if argv and argv[0] == command else argv
    if command == "finetune":
        return finetune(args)
    quiet_libraries()  # before bitsandbytes is imported: it warns at import about an offline hub kernel
    if command == "export":
        from .export.cli import main as export_main

        return export_main(args, prog="qlora-ga export")
    from .evaluate import main as evaluate_main

    return evaluate_main(args, prog="qlora-ga evaluate")


def finetune(argv: list[str] | None = None) -> int:
    """``qlora-ga finetune``: run it; return the exit code. Under a launcher, every process runs this: bad input (the
    same on all of them) is reported by the main one; a failure of one process ends it at once, and
    the launcher then stops the others."""
    quiet_libraries()
    code = _main(argv)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # under a launcher (distributed.launched, without importing torch)
        if code == 0:
            distributed.finish()
        else:  # leave now, without waiting for processes that may sit in a collective
            if code == 2:  # bad input, met by every process at about the same moment: let each exit with 2
                signal.signal(signal.SIGTERM, signal.SIG_IGN)  # before the launcher, seeing the first, stops the rest
                time.sleep(LAUNCHED_ERROR_GRACE_S)
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    return code


def _main(argv: list[str] | None) -> int:
    # (the launcher's RANK, from the environment: torch is not imported before the arguments are checked)
    main_process = os.environ.get("RANK", "0") == "0"
    where = f"process {os.environ.get('RANK', '0')}: " if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""
    try:
        argv = list(sys.argv[1:] if argv is None else argv)
        run(apply_demo_preset(parse_config(argv)), argv)
        return 0
    except QloraGaError as e:
        if main_process:  # the same on every process
            print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if main_process:
            print("interrupted: the last checkpoint is kept; continue with --resume", file=sys.stderr)
        return 130
    except MemoryError:
        print(f"error: {where}out of host memory: lower --batch-size, --max-length or --init-samples", file=sys.stderr)
        return 2
    except Exception as e:  # CUDA out-of-memory is a RuntimeError subclass
        import torch

        if isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower():
            print(f"error: {where}out of GPU memory: lower --batch-size (raise --grad-accum to keep the effective batch), "
                  "--max-length, or --init-samples / --init-micro-batch for the gradient pass", file=sys.stderr)
            return 2
        if distributed.launched():  # leave at once (see main)
            if distributed.peer_failed(e):  # a consequence: the failing process has said why
                print(f"error: {where}stopped: another process failed (its error is above)", file=sys.stderr)
            else:
                import traceback

                traceback.print_exc()
            return 1
        raise


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
