"""The base checkpoint of a merge: where it is, its safetensors shards, and reading it one tensor at a time.

Also which weights the 4-bit loader quantized (for the merge into ``deQ(Q(W))``).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import QloraGaError

log = logging.getLogger(__name__)



def resolve_base_folder(base: str) -> Path:
    """Local folder holding the base's safetensors: a folder, a ``.gguf`` (converted) or a hub id (HF cache)."""
    from ..model import resolve_model_source

    source = resolve_model_source(base)
    p = Path(source)
    if p.is_dir():
        return p
    try:
        from huggingface_hub import constants, snapshot_download

        offline = bool(constants.HF_HUB_OFFLINE) or os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0", "false")
        path = snapshot_download(
            source, local_files_only=offline,
            allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "tokenizer*"],
        )
    except Exception as e:  # noqa: BLE001 - huggingface_hub raises many kinds; all mean "not available"
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise QloraGaError(
            f"cannot find the base model '{base}' ({first}) -- pass --base with a local folder, or download it first"
            + (" (offline mode: it must be in the HF cache)" if os.environ.get("HF_HUB_OFFLINE") == "1" else "")
        ) from None
    return Path(path)


def base_shards(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [folder / f for f in files]
    if (folder / "model.safetensors").is_file():
        return [folder / "model.safetensors"]
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise QloraGaError(
            f"base '{folder}' has no safetensors weights: the merged export streams safetensors only "
            "(convert the base with save_pretrained(safe_serialization=True))"
        )
    return files


def _open_shard(path):
    from safetensors import safe_open

    return safe_open(str(path), framework="pt", device="cpu")


def _read_tensor(handle, name: str) -> torch.Tensor:
    """Read one tensor from an open shard (the single place the export reads base weights)."""
    return handle.get_tensor(name)


class ShardReader:
    """Reads base tensors through :func:`_read_tensor`, holding one shard open at a time."""

    def __init__(self):
        self.path, self.handle = None, None

    def read(self, path: Path, key: str) -> torch.Tensor:
        if path != self.path:
            self.close()
            self.handle, self.path = _open_shard(path).__enter__(), path
        return _read_tensor(self.handle, key)

    def close(self):
        if self.handle is not None:
            self.handle.__exit__(None, None, None)
            self.handle = self.path = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def quantized_weight_names(folder: Path, meta: dict | None, targets: set[str]) -> set[str]:
    """Weights the 4-bit loader quantized: from qlora_ga.json, else from the model's structure on meta."""
    q = (meta or {}).get("quantization") or {}
    if q.get("quantized_weights"):
        return set(q["quantized_weights"])
    try:
        from torch import nn
        from transformers import AutoConfig, AutoModelForCausalLM
        from transformers.quantizers.base import get_keys_to_not_convert

        cfg = AutoConfig.from_pretrained(str(folder))
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(cfg)
        skip = set(get_keys_to_not_convert(model))
        names = set()
        for name, mod in model.named_modules():
            if isinstance(mod, nn.Linear) and not any(name == s or name.startswith(s + ".") for s in skip):
                names.add(name + ".weight")
        return names
    except Exception as e:  # noqa: BLE001 - best effort; the targets are quantized in any case
        log.warning("cannot derive the quantized weights of %s (%s); dequantizing the LoRA targets only", folder, e)
        return set(targets)


@dataclass(frozen=True)
class BaseTensor:
    shard: Path
    shape: list[int]
    dtype: torch.dtype


# safetensors' header dtype codes (its format spec) -> torch dtypes; safetensors has no public accessor for this
HEADER_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                 "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                 "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


def _header_dtype(code: str, shard: Path, name: str) -> torch.dtype:
    if code not in HEADER_DTYPES:
        raise QloraGaError(f"{shard}: tensor '{name}' has dtype {code}, which the merge does not handle: "
                           "convert the base checkpoint to fp32/fp16/bf16 first")
    return HEADER_DTYPES[code]


def base_tensors(folder: Path) -> dict[str, BaseTensor]:
    """Every base tensor (shard, shape, dtype; from the shard headers, no data read), in reading order."""
    tensors = {}
    for shard in base_shards(folder):
        with _open_shard(shard) as f:
            for k in sorted(f.keys()):
                sl = f.get_slice(k)
                tensors[k] = BaseTensor(shard, sl.get_shape(), _header_dtype(sl.get_dtype(), shard, k))
    return tensors
