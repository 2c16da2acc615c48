#!/usr/bin/env python
"""Export a trained adapter: vanilla PEFT adapter (default), a merged 16-bit model (--merge), or a GGUF (--gguf).

    python scripts/export.py --adapter runs/x/adapter --out exported/adapter
    python scripts/export.py --adapter runs/x/adapter --out exported/merged --merge --dtype bf16 \
        [--merge-base original|dequantized] [--base MODEL] [--max-shard-size 2GB]
    python scripts/export.py --adapter runs/x/adapter --out exported/gguf --gguf q8_0 [--llama-cpp DIR]

See the ``qlora_ga/export/`` package (``adapter.py``, ``merge.py``, ``gguf.py``) for what each mode writes.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qlora_ga.log import quiet_libraries  # noqa: E402

quiet_libraries()  # before bitsandbytes is imported: it warns at import about an offline hub kernel
from qlora_ga.export.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(prog="export.py"))
