"""qlora-ga: LoRA-GA / LoRA-One adapters on a 4-bit base, from a block-bounded gradient pass.

Pipeline: :func:`load_model` -> :func:`estimate_factors` -> :func:`init_adapters` -> train -> export.
"""

from .errors import QloraGaError
from .gradient import Factors, PassReport, estimate_factors, gradient_pass
from .init import init_adapters
from .model import load_model

__all__ = ["QloraGaError", "Factors", "PassReport", "estimate_factors", "gradient_pass", "init_adapters", "load_model"]
__version__ = "0.1.0"
