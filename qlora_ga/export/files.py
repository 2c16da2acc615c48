"""The files of an export folder: their names, the two writers and the ``qlora_ga.json`` reader.

Every export form writes into a temporary folder (``fileio.atomic_dir``) that is renamed into place
when complete, so these writers write plain files and need no atomicity of their own.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from ..constants import CHECKPOINT_RESIDUAL
from ..errors import QloraGaError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS_BIN = "adapter_model.bin"
METADATA_FILE = "qlora_ga.json"
#: Optional file next to a rank-r PEFT adapter (e.g. a training checkpoint) holding
#: ``residual.residual_state_dict(peft_model)``; :func:`~qlora_ga.export.export_adapter` folds it into rank 2r.
#: ``residual.safetensors`` (the name train.py's checkpoints use) is accepted too.
RESIDUAL_FILE = "qlora_ga_residual.safetensors"
RESIDUAL_FILES = (RESIDUAL_FILE, CHECKPOINT_RESIDUAL)

TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "tokenizer.model", "spiece.model", "vocab.json", "vocab.txt", "merges.txt",
    "chat_template.jinja", "chat_template.json",
)
GENERATION_CONFIG = "generation_config.json"


def save_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict | None = None) -> None:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata or {"format": "pt"})


def write_json(obj, path: Path) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def copy_present(src: Path, dst: Path, names) -> None:
    """Copy each of ``names`` that exists in ``src`` into ``dst``."""
    for name in names:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)


def read_metadata(adapter_dir) -> dict | None:
    """The ``qlora_ga.json`` of an exported adapter, or ``None`` when there is none."""
    p = Path(adapter_dir) / METADATA_FILE
    if not p.is_file():
        return None
    try:
        return json.loads(p.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise QloraGaError(f"cannot read {p}: {e} -- delete the file or re-export the adapter") from None
