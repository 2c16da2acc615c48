"""``python -m qlora_ga.export ...``: the same command line as ``scripts/export.py``."""

import sys

from .cli import main

sys.exit(main(prog="python -m qlora_ga.export"))
