"""Keep the scripts' output to what the user needs: our lines, progress bars, and one-line errors."""

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
