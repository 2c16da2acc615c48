#!/usr/bin/env python
"""Export a trained adapter: vanilla PEFT adapter (default) or, with --merge, a merged 16-bit model.

    python scripts/export.py --adapter runs/x/adapter --out exported/adapter
    python scripts/export.py --adapter runs/x/adapter --out exported/merged --merge --dtype bf16 \
        [--merge-base original|dequantized] [--base MODEL] [--max-shard-size 2GB]

See ``qlora_ga/export.py`` for what each mode writes.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qlora_ga.export import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(prog="export.py"))
