#!/usr/bin/env python
"""Held-out loss and GSM8K-style exact match of a base, merged or adapter-carrying model.

    python scripts/evaluate.py --data heldout.jsonl [--model MODEL] [--no-quantize] [--adapter DIR] \
        [--max-examples N] [--max-new-tokens 256] [--batch-size 8] [--out report.json]

See ``qlora_ga/evaluate.py`` for the prompt format and the answer extraction.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qlora_ga.log import quiet_libraries  # noqa: E402

quiet_libraries()  # before bitsandbytes is imported: it warns at import about an offline hub kernel
from qlora_ga.evaluate import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(prog="evaluate.py"))
