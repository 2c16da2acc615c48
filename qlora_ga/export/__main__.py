"""``python -m qlora_ga.export ...``: the same command line as ``scripts/export.py``."""

import sys

from ..log import quiet_libraries

quiet_libraries()  # before bitsandbytes is imported (see scripts/export.py)
from .cli import main  # noqa: E402

sys.exit(main(prog="python -m qlora_ga.export"))
