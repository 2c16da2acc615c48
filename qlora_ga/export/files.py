"""The files of an export folder: their names, the two writers, the ``qlora_ga.json`` reader, the checks of ``--out``
and ``--adapter``, and of the command line's values (``--gguf``, ``--max-shard-size``); torch-free, so that the export
command answers a mistake before torch loads.

Every export form writes into a temporary folder (``fileio.atomic_dir``) that is renamed into place
when complete, so these writers write plain files and need no atomicity of their own.

Every form's ``qlora_ga.json`` names the form in its ``"format"`` field (:data:`EXPORT_FORMATS`): that is the
marker by which the command line recognises a folder as an earlier export it may replace
(:func:`check_out_dir`); :func:`check_out_not_over` keeps ``--out`` away from the folders an export reads.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from ..config import GGUF_TYPES
from ..constants import ADAPTER_WEIGHTS, CHECKPOINT_RESIDUAL
from ..errors import QloraGaError

if TYPE_CHECKING:
    import torch

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS_BIN = "adapter_model.bin"
METADATA_FILE = "qlora_ga.json"
#: Optional file next to a rank-r PEFT adapter (e.g. a training checkpoint) holding
#: ``residual.residual_state_dict(peft_model)``; :func:`~qlora_ga.export.export_adapter` folds it into rank 2r.
#: ``residual.safetensors`` (the name the training checkpoints' first format used) is accepted too.
RESIDUAL_FILE = "qlora_ga_residual.safetensors"
RESIDUAL_FILES = (RESIDUAL_FILE, CHECKPOINT_RESIDUAL)

TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "tokenizer.model", "spiece.model", "vocab.json", "vocab.txt", "merges.txt",
    "chat_template.jinja", "chat_template.json",
)
GENERATION_CONFIG = "generation_config.json"
#: what ``merge_export`` merges into: the original 16-bit weights, or deQ(Q(W)) (the exact trained function)
MERGE_BASES = ("original", "dequantized")


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


# ----------------------------------------------------------------------------- what --out may be

#: the ``"format"`` of each export form's ``qlora_ga.json``: the marker of a folder an export wrote
EXPORT_FORMATS = {"adapter": "qlora-ga-adapter", "merged": "qlora-ga-merged", "gguf": "qlora-ga-gguf"}
EXPORT_NAMES = {"adapter": "adapter export", "merged": "merged-model export", "gguf": "GGUF export"}
#: what each form writes into its folder (names, or patterns of names)
_EXPORT_FILES = {
    "adapter": (ADAPTER_CONFIG, ADAPTER_WEIGHTS, METADATA_FILE, "README.md", *TOKENIZER_FILES),
    "merged": ("config.json", "model.safetensors.index.json", GENERATION_CONFIG, METADATA_FILE, *TOKENIZER_FILES,
               re.compile(r"model(-\d+-of-\d+)?\.safetensors")),
    "gguf": ("Modelfile", METADATA_FILE, re.compile(r"model-\w+\.gguf")),
}
#: what finetune.py writes into its --output-dir (qlora_ga/outdir.py), to name a training run
RUN_FILES = ("run_config.yaml", "checkpoints", "metrics.jsonl", "init_report.json", "summary.json")
_MODEL_FILE = re.compile(r".*\.(safetensors|gguf|bin|pt|pth)")


def _some(names: list[str]) -> str:
    return ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")


def _a(noun: str) -> str:
    return ("an " if noun[0] in "aeiou" else "a ") + noun


def export_kind(folder) -> str | None:
    """``"adapter"``, ``"merged"`` or ``"gguf"`` when ``folder`` holds an export (its ``qlora_ga.json`` says which), else None."""
    try:
        meta = json.loads((Path(folder) / METADATA_FILE).read_text())
    except (OSError, ValueError):
        return None
    fmt = meta.get("format") if isinstance(meta, dict) else None
    return next((kind for kind, f in EXPORT_FORMATS.items() if f == fmt), None)


def _written_by(kind: str, folder: Path, name: str) -> bool:
    return (folder / name).is_file() and any(
        name == f if isinstance(f, str) else f.fullmatch(name) for f in _EXPORT_FILES[kind])


def _what_is_in(names: list[str]) -> str:
    """What a folder that no export wrote holds, in a few words."""
    run = [n for n in RUN_FILES if n in names]
    if run:
        return f"a training run ({_some(run)})"
    if ADAPTER_CONFIG in names:
        return f"an adapter ({_some([n for n in (ADAPTER_CONFIG, ADAPTER_WEIGHTS, ADAPTER_WEIGHTS_BIN) if n in names])})"
    model = [n for n in names if n == "config.json" or _MODEL_FILE.fullmatch(n)]
    if model:
        return f"a model ({_some(model)})"
    return f"files qlora-ga did not write ({_some(names)})"


def check_out_dir(out, kind: str, overwrite: bool) -> None:
    """The command line's rule for an existing ``--out``: it never replaces what it did not write.

    A missing or empty folder is fine. A folder holding an earlier export of the same ``kind`` (its
    ``qlora_ga.json`` says so, and it holds nothing that export does not write) is replaced only with
    ``overwrite``. Anything else (a training run, a model, another form's export, other files, a file)
    is refused with one line naming what is there.
    """
    out = Path(out)
    if not out.exists():
        return
    if not out.is_dir():
        raise QloraGaError(f"--out '{out}' is a file, not a folder: choose another --out")
    names = sorted(p.name for p in out.iterdir())
    if not names:
        return
    parent = out.resolve().parent
    if (parent / "run_config.yaml").is_file() or (parent / "checkpoints").is_dir():  # a run's adapter/, merged/, gguf/
        raise QloraGaError(f"--out '{out}' belongs to the training run in '{parent}' (its {out.name}/): "
                           "choose another --out")
    found = export_kind(out)
    if found is None:
        raise QloraGaError(f"--out '{out}' holds {_what_is_in(names)}: choose another --out")
    label = EXPORT_NAMES[found]
    strangers = [n for n in names if not _written_by(found, out, n)]
    if strangers:
        raise QloraGaError(f"--out '{out}' holds an earlier {label} and other files that --overwrite would delete "
                           f"({_some(strangers)}): move them away or choose another --out")
    if found != kind:
        raise QloraGaError(f"--out '{out}' holds {_a(label)}, not {_a(EXPORT_NAMES[kind])}: choose another --out")
    if not overwrite:
        raise QloraGaError(f"--out '{out}' holds an earlier {label}: pass --overwrite to replace it, or choose another --out")


def check_out_not_over(out, inputs: dict, *, may_be_inside: bool = False) -> None:
    """Refuse an ``out`` that is one of the folders an export reads (``{what: folder}``), holds one, or (unless
    ``may_be_inside``) is inside one."""
    o = Path(os.path.realpath(Path(out).expanduser()))
    for what, folder in inputs.items():
        if folder is None:
            continue
        f = Path(os.path.realpath(Path(folder).expanduser()))
        if o == f or o in f.parents:
            raise QloraGaError(f"--out '{out}' would replace the adapter or model folder "
                               f"(it {'is' if o == f else 'holds'} the {what} folder '{folder}'): choose another --out")
        if f in o.parents and not may_be_inside:
            raise QloraGaError(f"--out '{out}' is inside the {what} folder '{folder}': choose another --out")


def check_adapter_dir(d: Path) -> None:
    """A folder holding a PEFT adapter's config, or one line saying what is wrong."""
    if not d.is_dir():
        raise QloraGaError(f"adapter folder '{d}' does not exist: pass the folder written by the trainer or save_adapter")
    if not (d / ADAPTER_CONFIG).is_file():
        raise QloraGaError(f"'{d}' has no {ADAPTER_CONFIG}: pass a PEFT adapter folder")


# ----------------------------------------------------------------------------- the command line's values, checked before torch loads


def check_type(gguf_type: str) -> str:
    if gguf_type not in GGUF_TYPES:
        raise QloraGaError(f"unknown GGUF type '{gguf_type}': use one of {', '.join(GGUF_TYPES)}")
    return gguf_type


def parse_size(size) -> int:
    """``"2GB"`` -> 2_000_000_000, ``"500MiB"`` -> 524_288_000, ``123`` -> 123 (bytes)."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)?\s*", str(size).upper())
    if not m:
        raise QloraGaError(f"cannot parse size '{size}': write e.g. 2GB, 500MB or 800MiB")
    unit = m.group(2) or "B"
    unit = unit if unit.endswith("B") else unit + "B"
    base = 1024 if "I" in unit else 1000
    power = {"B": 0, "K": 1, "M": 2, "G": 3, "T": 4}[unit[0]]
    n = int(float(m.group(1)) * base**power)
    if n <= 0:
        raise QloraGaError(f"size '{size}' must be positive")
    return n
