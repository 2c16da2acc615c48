"""Keep the commands' output to what the user needs: our lines (from the main process), progress bars, and one-line
errors."""

import logging
import os
import warnings


def quiet_libraries():
    """Silence the libraries' chatter (deprecations, CPU-kernel notices, paged-optimizer fallbacks)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", message=r".*(paged|needs CUDA|MatMul4Bit|torch.utils.checkpoint|use_reentrant).*")
    warnings.filterwarnings("ignore", category=FutureWarning)
    # "kernels": bitsandbytes asks the hub for a CPU kernel at import and warns when offline (nothing to act on)
    for name in ("transformers", "bitsandbytes", "peft", "kernels"):
        logging.getLogger(name).setLevel(logging.ERROR)
    # datasets logs parse failures with a traceback before raising; the one-line error says it all
    logging.getLogger("datasets").setLevel(logging.CRITICAL)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
    except ImportError:  # pragma: no cover
        pass


class _Distributed:
    """``qlora_ga.distributed``, imported on first use: the commands check their arguments before torch loads."""

    def __getattr__(self, name):
        from . import distributed as module

        return getattr(module, name)


distributed = _Distributed()


def say(msg: str):
    """One line of the run's output, from the main process only."""
    if distributed.is_main():
        print(msg, flush=True)
