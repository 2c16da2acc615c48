"""Step 5 of the pipeline: export a trained adapter (DESIGN section 6).

Two products:

* **Adapter** (:func:`save_adapter`, :func:`export_adapter`): vanilla PEFT format,
  ``adapter_config.json`` + ``adapter_model.safetensors``, that plain
  ``peft.PeftModel.from_pretrained(base_4bit, out_dir)`` loads and that reproduces the trained
  model's logits. A layer that carries the frozen LoRA-GA residual (``qlora_ga/residual.py``)
  computes ``base(x) + s * (B A x - B0 A0 x)``; vanilla PEFT has no such term, so the residual is
  folded into a LoRA of twice the rank: ``A' = [A; A0]`` (2r x n) and ``B' = [B, -B0]`` (m x 2r),
  because ``B' A' = B A - B0 A0`` exactly. Rank r is not enough: ``B A - B0 A0`` is a difference
  of two independent rank-r products and has rank up to 2r in general, so no rank-r pair can hold
  it without an approximation (an SVD truncation would change the function). The exported config
  says ``r = 2r`` and keeps the trained ``use_rslora`` flag with ``lora_alpha`` chosen so that
  PEFT's scaling equals the trained ``s`` (``alpha = s * sqrt(2r)`` with rsLoRA, ``s * 2r``
  without); layers whose (rank, scaling) differ from the most common one get exact per-module
  entries in ``rank_pattern`` / ``alpha_pattern``. Loaded in vanilla PEFT, the ``A0``/``B0`` half
  is an ordinary (trainable) part of the LoRA; for inference this changes nothing.
  Next to it, ``qlora_ga.json`` records the method metadata (trained rank, scaling, whether a
  residual was folded, the base model source, which weights the 4-bit loader quantized and in
  which dtype). It is read when present (e.g. by :func:`merge_export` to find the base), but the
  adapter never needs it.

* **Merged model** (:func:`merge_export`): for every LoRA target weight ``W`` the output holds
  ``W_base + s * (B' @ A')`` (merge math in fp32, then a cast to fp16/bf16/fp32), written as
  sharded safetensors with ``model.safetensors.index.json`` (one ``model.safetensors`` when it
  fits in one shard, exactly like ``save_pretrained``), ``config.json`` without
  ``quantization_config``, the tokenizer files and ``generation_config.json``. The base is read
  ONE tensor at a time from its 16-bit safetensors shards and output tensors are buffered only
  until ``max_shard_size``, so host memory stays near one shard whatever the model size.

  ``merge_base`` chooses ``W_base``:

  - ``"original"`` (default): ``W`` as stored in the base checkpoint. This is the usual QLoRA
    merge: the adapter was trained against ``deQ(Q(W))`` and is now added to the weight it
    approximates, so the merged model differs from the trained 4-bit model by the quantization
    error ``W - deQ(Q(W))`` (typically a small change of held-out loss, often an improvement).
  - ``"dequantized"``: ``deQ(Q(W))``, i.e. ``W`` quantized with bitsandbytes NF4 + double
    quantization (blocksize 64) exactly like the Hugging Face 4-bit loader does it (from ``W``
    cast to the loader's compute dtype, fp32 on CPU), then dequantized. This is applied to every
    weight the loader quantized (taken from ``qlora_ga.json``, else derived from the model's
    structure), targets or not, so the merged model computes exactly the function that was trained
    (up to fp rounding and the output dtype).

A third product, a GGUF for llama.cpp / Ollama (merge, then llama.cpp's own converter), lives in
``qlora_ga/gguf.py``; ``main`` reaches it with ``--gguf TYPE``.

Everything is written into a temporary folder next to ``out_dir`` and renamed into place only when
complete; an existing ``out_dir`` is replaced only after the new one is fully written.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import os
import re
import shutil
import sys
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .constants import PEFT_PREFIX
from .errors import QloraGaError
from .fileio import atomic_dir
from .log import quiet_libraries

log = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_WEIGHTS_BIN = "adapter_model.bin"
METADATA_FILE = "qlora_ga.json"
#: Optional file next to a rank-r PEFT adapter (e.g. a training checkpoint) holding
#: ``residual.residual_state_dict(peft_model)``; :func:`export_adapter` folds it into rank 2r.
#: ``residual.safetensors`` (the name train.py's checkpoints use) is accepted too.
RESIDUAL_FILE = "qlora_ga_residual.safetensors"
RESIDUAL_FILES = (RESIDUAL_FILE, "residual.safetensors")

TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "tokenizer.model", "spiece.model", "vocab.json", "vocab.txt", "merges.txt",
    "chat_template.jinja", "chat_template.json",
)
GENERATION_CONFIG = "generation_config.json"

DTYPES = {
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp32": torch.float32, "float32": torch.float32, "float": torch.float32,
}
DTYPE_NAMES = {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32"}
FP16_MAX = 65504.0

_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<which>A|B)\.weight$")


# ----------------------------------------------------------------------------- small helpers


def _dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPE_NAMES:
            raise QloraGaError(f"unsupported dtype {dtype}: use fp16, bf16 or fp32")
        return dtype
    d = DTYPES.get(str(dtype).lower().removeprefix("torch."))
    if d is None:
        raise QloraGaError(f"unknown dtype '{dtype}': use fp16, bf16 or fp32")
    return d


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


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _drop_internal(sd: dict) -> dict:
    """Drop entries of qlora_ga's private attributes (``._qlora_ga_*``) that leak into PEFT state dicts."""
    return {k: v for k, v in sd.items() if "._qlora_ga_" not in k and not k.startswith("_qlora_ga_")}


def _module_key(peft_name: str) -> str:
    """``base_model.model.model.layers.0.q_proj`` -> ``model.layers.0.q_proj`` (the base model's name)."""
    return peft_name[len(PEFT_PREFIX):] if peft_name.startswith(PEFT_PREFIX) else peft_name


def _get_pattern_key(pattern_keys, key: str) -> str:
    try:
        from peft.utils.other import get_pattern_key

        return get_pattern_key(pattern_keys, key)
    except ImportError:  # pragma: no cover - older/newer peft
        for k in pattern_keys:
            if re.match(rf"(.*\.)?({k})$", key):
                return k
        return key


def config_scaling(config, module: str) -> tuple[int, float]:
    """``(rank, scaling)`` that PEFT gives ``module`` (base-model name) under a LoRA ``config``."""
    rank_pattern = config.rank_pattern or {}
    alpha_pattern = config.alpha_pattern or {}
    r = rank_pattern.get(_get_pattern_key(rank_pattern.keys(), module), config.r)
    alpha = alpha_pattern.get(_get_pattern_key(alpha_pattern.keys(), module), config.lora_alpha)
    return r, (alpha / math.sqrt(r) if config.use_rslora else alpha / r)


def _save_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict | None = None):
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata or {"format": "pt"})


def _write_json(obj, path: Path):
    path.write_text(json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def read_metadata(adapter_dir) -> dict | None:
    """The ``qlora_ga.json`` of an exported adapter, or ``None`` when there is none."""
    p = Path(adapter_dir) / METADATA_FILE
    if not p.is_file():
        return None
    try:
        return json.loads(p.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise QloraGaError(f"cannot read {p}: {e} -- delete the file or re-export the adapter") from None


# ----------------------------------------------------------------------------- adapter export


def fold_residuals(
    lora_state: dict[str, torch.Tensor],
    config,
    residuals: dict[str, tuple[torch.Tensor, torch.Tensor]],
    scalings: dict[str, float] | None = None,
):
    """Fold frozen residuals into a rank-2r LoRA; return ``(state_dict, config)`` in vanilla PEFT form.

    ``lora_state``: a PEFT adapter state dict (keys ``base_model.model.<module>.lora_A.weight`` ...,
    adapter name removed, as ``get_peft_model_state_dict`` gives it). ``residuals``:
    ``{<module>: (A0, B0)}`` with base-model module names. ``scalings``: the trained
    ``{<module>: s}`` (default: what ``config`` gives each module). Every module with a residual
    gets ``A' = [A; A0]``, ``B' = [B, -B0]``; the returned config has ranks and alphas such that
    PEFT's scaling is unchanged for every module (see the module docstring).
    """
    sd = dict(lora_state)
    modules: dict[str, int] = {}
    for key, t in sd.items():
        m = _LORA_KEY.match(key)
        if m and m.group("which") == "A":
            modules[_module_key(m.group("module"))] = t.shape[0]
        elif ".lora_embedding_A" in key:
            modules[_module_key(key.split(".lora_embedding_A")[0])] = t.shape[0]
    unknown = sorted(set(residuals) - set(modules))
    if unknown:
        raise QloraGaError(f"residual for '{unknown[0]}' has no LoRA weights in the adapter: the residual does not belong to it")
    scalings = dict(scalings or {})
    new_rank: dict[str, int] = {}
    for mod, r in modules.items():
        if mod not in scalings:
            scalings[mod] = config_scaling(config, mod)[1]
        new_rank[mod] = r
    for mod, (a0, b0) in residuals.items():
        ka, kb = f"{PEFT_PREFIX}{mod}.lora_A.weight", f"{PEFT_PREFIX}{mod}.lora_B.weight"
        A, B = sd[ka], sd[kb]
        dt = torch.promote_types(A.dtype, a0.dtype)
        if a0.shape[1] != A.shape[1] or b0.shape[0] != B.shape[0] or a0.shape[0] != b0.shape[1]:
            raise QloraGaError(
                f"residual of '{mod}' has shapes A0 {tuple(a0.shape)}, B0 {tuple(b0.shape)} that do not fit "
                f"A {tuple(A.shape)}, B {tuple(B.shape)}"
            )
        sd[ka] = torch.cat([A.to(dt), a0.to(device=A.device, dtype=dt)], dim=0).contiguous()
        sd[kb] = torch.cat([B.to(dt), -b0.to(device=B.device, dtype=dt)], dim=1).contiguous()
        new_rank[mod] = sd[ka].shape[0]

    cfg = copy.deepcopy(config)
    rslora = bool(cfg.use_rslora)

    def alpha_for(r, s):
        return s * math.sqrt(r) if rslora else s * r

    pairs = {mod: (new_rank[mod], scalings[mod]) for mod in modules}
    (r_def, s_def), _ = Counter(pairs.values()).most_common(1)[0]
    a_def = alpha_for(r_def, s_def)
    if float(a_def).is_integer():
        a_def = int(a_def)
    cfg.r, cfg.lora_alpha = r_def, a_def
    cfg.rank_pattern = {mod: r for mod, (r, s) in sorted(pairs.items()) if r != r_def}
    cfg.alpha_pattern = {mod: alpha_for(r, s) for mod, (r, s) in sorted(pairs.items()) if (r, s) != (r_def, s_def)}
    # Weights are loaded from the file; an init that rewrites the base (pissa, olora, ...) must not run.
    cfg.init_lora_weights = True
    return sd, cfg


def _adapter_metadata(config, *, trained_rank, scalings: dict[str, float], residual_modules, base, extra=None,
                      exported_rank=None) -> dict:
    svals = set(scalings.values())
    meta = {
        "format": "qlora-ga-adapter",
        "format_version": 1,
        "rank": trained_rank,
        "exported_rank": exported_rank if exported_rank is not None else trained_rank,
        "scaling": next(iter(svals)) if len(svals) == 1 else dict(sorted(scalings.items())),
        "use_rslora": bool(config.use_rslora),
        "has_residual": bool(residual_modules),
        "residual_folded": bool(residual_modules),
        "residual_modules": sorted(residual_modules),
        "residual_layout": "lora_A = [A; A0], lora_B = [B, -B0]: the trailing rows of lora_A and columns of lora_B "
                           "are the frozen residual" if residual_modules else None,
        "base_model": base,
    }
    if extra:
        meta.update(extra)
    return meta


def save_adapter(peft_model, out_dir, *, adapter_name: str = "default", metadata: dict | None = None) -> Path:
    """Write ``peft_model``'s adapter in vanilla PEFT format to ``out_dir`` (atomically); return the folder.

    Without residuals this is what ``peft_model.save_pretrained`` writes. Layers with a frozen
    residual (``residual.iter_residuals``) are exported as the rank-2r LoRA ``A' = [A; A0]``,
    ``B' = [B, -B0]`` with the config rank ``2r`` and ``lora_alpha`` chosen so that PEFT's scaling
    equals each layer's trained ``s`` (``alpha = s * sqrt(2r)`` when ``use_rslora``, else ``s * 2r``;
    per-module ``rank_pattern``/``alpha_pattern`` entries where layers differ). The rank must be 2r
    because ``B A - B0 A0`` has rank up to 2r: no rank-r LoRA reproduces it exactly.
    ``qlora_ga.json`` (trained rank, scaling, residual flag, base source, quantized weights and
    their compute dtype, plus ``metadata``) is written next to it.
    """
    import bitsandbytes as bnb
    from peft import get_peft_model_state_dict

    from .residual import iter_residuals

    if adapter_name not in getattr(peft_model, "peft_config", {}):
        raise QloraGaError(f"the model has no adapter named '{adapter_name}': pass a PeftModel with that adapter")
    config = peft_model.peft_config[adapter_name]
    lora_state = get_peft_model_state_dict(peft_model, adapter_name=adapter_name)
    lora_state = {k: v.detach().to("cpu").clone() for k, v in _drop_internal(lora_state).items()}

    residuals, scalings = {}, {}
    for name, mod in peft_model.named_modules():
        sc = getattr(mod, "scaling", None)
        if isinstance(sc, dict) and adapter_name in sc and hasattr(mod, "lora_A"):
            scalings[_module_key(name)] = float(sc[adapter_name])
    for name, layer, a0, b0 in iter_residuals(peft_model):
        if adapter_name in getattr(layer, "lora_A", {}):
            residuals[_module_key(name)] = (a0.detach().cpu(), b0.detach().cpu())

    base_model = peft_model.get_base_model() if hasattr(peft_model, "get_base_model") else peft_model
    # the name the user gave (hub id, folder or .gguf file), portable across machines; the merge resolves it again
    source = (getattr(base_model, "qlora_ga_name", None) or getattr(base_model, "qlora_ga_source", None)
              or config.base_model_name_or_path)
    quantized, quant_dtype, quant_device = [], None, None
    for name, mod in base_model.named_modules():
        if isinstance(mod, bnb.nn.Linear4bit):
            quantized.append(name.removesuffix(".base_layer") + ".weight")
            qs = getattr(mod.weight, "quant_state", None)
            if qs is not None and quant_dtype is None:
                quant_dtype = DTYPE_NAMES.get(qs.dtype, str(qs.dtype))
                quant_device = mod.weight.device.type
    extra = {}
    if quantized:
        extra["quantization"] = {"quant_type": "nf4", "double_quant": True, "blocksize": 64,
                                 "compute_dtype": quant_dtype, "device": quant_device,
                                 "quantized_weights": quantized}
    extra.update(metadata or {})

    trained_rank = int(config.r)
    sd, cfg = fold_residuals(lora_state, config, residuals, scalings)
    if not residuals:
        cfg = copy.deepcopy(config)  # unchanged, exactly like save_pretrained
    if source is not None:
        cfg.base_model_name_or_path = str(source)
    meta = _adapter_metadata(config, trained_rank=trained_rank, scalings=scalings, residual_modules=list(residuals),
                             base=str(source) if source is not None else None, extra=extra, exported_rank=int(cfg.r))
    return _write_adapter(out_dir, sd, cfg, meta)


def _write_adapter(out_dir, sd, cfg, meta, copy_from: Path | None = None) -> Path:
    with atomic_dir(out_dir) as tmp:
        inference_mode = cfg.inference_mode
        cfg.inference_mode = True  # as peft's save_pretrained writes it
        try:
            cfg.save_pretrained(str(tmp))
        finally:
            cfg.inference_mode = inference_mode
        _save_safetensors(sd, tmp / ADAPTER_WEIGHTS)
        _write_json(meta, tmp / METADATA_FILE)
        if copy_from is not None:
            for name in (*TOKENIZER_FILES, "README.md"):
                if (copy_from / name).is_file():
                    shutil.copy2(copy_from / name, tmp / name)
    return Path(out_dir)


def _load_adapter_dir(adapter_dir) -> tuple:
    """``(config, state_dict, metadata)`` of an adapter folder, residual file folded in when present."""
    from peft import LoraConfig

    d = Path(adapter_dir).expanduser()
    if not d.is_dir():
        raise QloraGaError(f"adapter folder '{d}' does not exist: pass the folder written by the trainer or save_adapter")
    if not (d / ADAPTER_CONFIG).is_file():
        raise QloraGaError(f"'{d}' has no {ADAPTER_CONFIG}: pass a PEFT adapter folder")
    try:
        config = LoraConfig.from_pretrained(str(d))
    except (TypeError, ValueError, json.JSONDecodeError) as e:
        raise QloraGaError(f"cannot read {d / ADAPTER_CONFIG}: {str(e).splitlines()[0] if str(e) else e}") from None
    if str(getattr(config, "peft_type", "LORA")).split(".")[-1].upper() != "LORA":
        raise QloraGaError(f"'{d}' holds a {config.peft_type} adapter: only LoRA adapters can be exported")
    if (d / ADAPTER_WEIGHTS).is_file():
        from safetensors.torch import load_file

        sd = load_file(str(d / ADAPTER_WEIGHTS))
    elif (d / ADAPTER_WEIGHTS_BIN).is_file():
        sd = torch.load(d / ADAPTER_WEIGHTS_BIN, map_location="cpu", weights_only=True)
    else:
        raise QloraGaError(f"'{d}' has no {ADAPTER_WEIGHTS}: the adapter weights are missing")
    sd = _drop_internal(sd)
    meta = read_metadata(d)
    res_file = next((d / n for n in RESIDUAL_FILES if (d / n).is_file()), None)
    if res_file is not None:
        from safetensors.torch import load_file

        from .residual import A0_NAME, B0_NAME

        if meta and meta.get("residual_folded"):
            raise QloraGaError(f"'{d}' has both a folded adapter and {res_file.name}: remove one of them")
        rsd = load_file(str(res_file))
        residuals = {}
        for key in rsd:
            mod = key.rsplit(".", 1)[0]
            residuals[_module_key(mod)] = (rsd[f"{mod}.{A0_NAME}"], rsd[f"{mod}.{B0_NAME}"])
        trained_rank = int(config.r)
        scalings = {}
        for key in sd:
            m = _LORA_KEY.match(key)
            if m and m.group("which") == "A":
                scalings[_module_key(m.group("module"))] = config_scaling(config, _module_key(m.group("module")))[1]
        sd, new_cfg = fold_residuals(sd, config, residuals, scalings)
        meta = {**(meta or {}), **_adapter_metadata(
            config, trained_rank=trained_rank, scalings=scalings, residual_modules=list(residuals),
            base=(meta or {}).get("base_model") or config.base_model_name_or_path, exported_rank=int(new_cfg.r))}
        config = new_cfg
    elif meta and meta.get("has_residual") and not meta.get("residual_folded"):
        raise QloraGaError(f"'{d}' was trained with a residual but {RESIDUAL_FILE} is missing: the adapter alone is not the trained model")
    return config, sd, meta


def export_adapter(adapter_dir, out_dir) -> Path:
    """Re-save an adapter folder in vanilla PEFT format (folding a ``qlora_ga_residual.safetensors``)."""
    src = Path(adapter_dir).expanduser()
    if src.absolute() == Path(out_dir).expanduser().absolute():
        raise QloraGaError("--out must differ from --adapter")
    config, sd, meta = _load_adapter_dir(src)
    if meta is None:
        scalings = {}
        for key in sd:
            m = _LORA_KEY.match(key)
            if m and m.group("which") == "A":
                mod = _module_key(m.group("module"))
                scalings[mod] = config_scaling(config, mod)[1]
        meta = _adapter_metadata(config, trained_rank=int(config.r), scalings=scalings, residual_modules=[],
                                 base=config.base_model_name_or_path)
    return _write_adapter(out_dir, sd, config, meta, copy_from=src)


# ----------------------------------------------------------------------------- merged export


@dataclass
class MergeStats:
    out_dir: str
    tensors_written: int
    tensors_merged: int
    tensors_dequantized: int
    shards: int
    total_bytes: int
    peak_bytes: int  # most bytes of tensors held at once (shard buffer + the tensor being processed)
    largest_tensor_bytes: int
    dtype: str
    merge_base: str

    def to_dict(self) -> dict:
        return asdict(self)


def _open_shard(path):
    from safetensors import safe_open

    return safe_open(str(path), framework="pt", device="cpu")


def _read_tensor(handle, name: str) -> torch.Tensor:
    """Read one tensor from an open shard (the single place the export reads base weights)."""
    return handle.get_tensor(name)


def resolve_base_folder(base: str) -> Path:
    """Local folder holding the base's safetensors: a folder, a ``.gguf`` (converted) or a hub id (HF cache)."""
    from .model import resolve_model_source

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


def _base_shards(folder: Path) -> list[Path]:
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


def _quantized_weight_names(folder: Path, meta: dict | None, targets: set[str]) -> set[str]:
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


def _quantize_roundtrip(w: torch.Tensor, compute_dtype: torch.dtype, device: str = "cpu") -> torch.Tensor:
    """``deQ(Q(w))`` with NF4, double quant, blocksize 64 (the HF 4-bit loader's settings), as fp32 on the CPU.

    ``w`` is cast to the loader's compute dtype first (the loader quantizes the weight as loaded in
    that dtype) and the result is dequantized in that dtype, like the 4-bit layer's forward does.
    ``device="cuda"`` runs the bitsandbytes CUDA kernels (as a GPU load does) when CUDA is available.
    """
    import bitsandbytes.functional as F

    dev = torch.device("cuda") if device == "cuda" and torch.cuda.is_available() else torch.device("cpu")
    q, state = F.quantize_4bit(w.to(device=dev, dtype=compute_dtype).contiguous(), blocksize=64,
                               compress_statistics=True, quant_type="nf4", quant_storage=torch.uint8)
    return F.dequantize_4bit(q, state).float().cpu()


def merge_export(
    adapter_dir,
    out_dir,
    base: str | None = None,
    dtype="fp16",
    merge_base: str = "original",
    max_shard_size="2GB",
    quant_compute_dtype=None,
) -> MergeStats:
    """Merge an adapter into its base and write a plain 16/32-bit checkpoint (see the module docstring).

    ``base``: local folder, hub id (resolved in the HF cache; offline when ``HF_HUB_OFFLINE=1``) or
    ``.gguf`` file; default: ``base_model`` of ``qlora_ga.json``, else the adapter config's
    ``base_model_name_or_path``. ``dtype``: output dtype of floating tensors. ``merge_base``:
    ``"original"`` or ``"dequantized"``. ``max_shard_size``: shard size (``"2GB"``, bytes...).
    ``quant_compute_dtype``: dtype the 4-bit loader quantized from (default: recorded in
    ``qlora_ga.json``, else fp32); the quantization runs on the device type recorded there (CUDA
    when the model was trained on a GPU and CUDA is available here), else on the CPU.
    Returns :class:`MergeStats`.
    """
    out_dtype = _dtype(dtype)
    if merge_base not in ("original", "dequantized"):
        raise QloraGaError(f"unknown merge base '{merge_base}': use 'original' or 'dequantized'")
    shard_limit = parse_size(max_shard_size)
    adapter_dir = Path(adapter_dir).expanduser()
    config, sd, meta = _load_adapter_dir(adapter_dir)

    if getattr(config, "use_dora", False):
        raise QloraGaError("the adapter uses DoRA, which the merged export does not support: export the adapter instead")
    lora: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in sd.items():
        m = _LORA_KEY.match(key)
        if not m:
            raise QloraGaError(
                f"adapter tensor '{key}' is not a LoRA linear weight: the merged export supports plain LoRA on "
                "linear layers only (no modules_to_save, embeddings or LoRA biases)"
            )
        lora.setdefault(_module_key(m.group("module")), {})[m.group("which")] = t
    deltas: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = {}
    for mod, ab in lora.items():
        if set(ab) != {"A", "B"}:
            raise QloraGaError(f"adapter module '{mod}' lacks its lora_{'A' if 'A' not in ab else 'B'} weight: the adapter is incomplete")
        r, s = config_scaling(config, mod)
        if ab["A"].shape[0] != r or ab["B"].shape[1] != r:
            raise QloraGaError(
                f"adapter module '{mod}' has rank {ab['A'].shape[0]} but its config says {r}: the adapter files do not match"
            )
        deltas[f"{mod}.weight"] = (ab["B"], ab["A"], s)

    base = base or (meta or {}).get("base_model") or config.base_model_name_or_path
    if not base:
        raise QloraGaError("the adapter does not say which base model it belongs to: pass --base")
    folder = resolve_base_folder(str(base))
    out = Path(out_dir).expanduser().absolute()
    if out in (folder.absolute(), adapter_dir.absolute()):
        raise QloraGaError("--out must differ from the base model folder and the adapter folder")
    if not (folder / "config.json").is_file():
        raise QloraGaError(f"base '{folder}' has no config.json: pass the base model folder with --base")
    model_config = json.loads((folder / "config.json").read_text())
    if model_config.get("quantization_config"):
        raise QloraGaError(
            f"base '{base}' is a quantized checkpoint: merge into the original 16-bit model (pass it with --base)"
        )
    shards = _base_shards(folder)

    # Map every tensor to its shard (keys only: no data read) and check the targets exist.
    names: list[tuple[Path, str]] = []
    for shard in shards:
        with _open_shard(shard) as f:
            names.extend((shard, k) for k in sorted(f.keys()))
    present = {k for _, k in names}
    missing = sorted(set(deltas) - present)
    if missing:
        raise QloraGaError(
            f"base '{base}' has no tensor '{missing[0]}' that the adapter modifies ({len(missing)} missing): "
            "the adapter was trained on a different model"
        )

    qdtype = None
    quantized: set[str] = set()
    qinfo = (meta or {}).get("quantization") or {}
    qdevice = qinfo.get("device") or "cpu"
    if merge_base == "dequantized":
        qdtype = _dtype(quant_compute_dtype or qinfo.get("compute_dtype") or "fp32")
        quantized = _quantized_weight_names(folder, meta, set(deltas)) & present | set(deltas)

    fp16 = out_dtype == torch.float16
    buffer: dict[str, torch.Tensor] = {}
    buffer_bytes = 0
    peak = largest = total = 0
    weight_map: dict[str, str] = {}
    shard_files: list[tuple[str, list[str]]] = []
    n_merged = n_deq = 0

    with atomic_dir(out) as tmp:

        def flush():
            nonlocal buffer, buffer_bytes
            if not buffer:
                return
            name = f"shard-{len(shard_files):05d}.tmp.safetensors"
            _save_safetensors(buffer, tmp / name)
            shard_files.append((name, list(buffer)))
            buffer, buffer_bytes = {}, 0

        current = None
        handle = None
        try:
            for shard, key in names:
                if shard != current:
                    if handle is not None:
                        handle.__exit__(None, None, None)
                    handle = _open_shard(shard).__enter__()
                    current = shard
                t = _read_tensor(handle, key)
                held = _nbytes(t)
                if t.is_floating_point():
                    work = None
                    if key in quantized:
                        work = _quantize_roundtrip(t, qdtype, qdevice)
                        n_deq += 1
                    if key in deltas:
                        B, A, s = deltas[key]
                        if work is None:
                            work = t.to(torch.float32, copy=True)  # never modify the tensor read in place
                        delta = B.float() @ A.float()
                        if getattr(config, "fan_in_fan_out", False):
                            delta = delta.T
                        if delta.shape != work.shape:
                            raise QloraGaError(
                                f"adapter update for '{key}' has shape {tuple(delta.shape)} but the base weight is "
                                f"{tuple(work.shape)}: the adapter was trained on a different model"
                            )
                        held += _nbytes(delta)
                        work.add_(delta, alpha=s)
                        del delta
                        n_merged += 1
                    src = work if work is not None else t
                    if fp16 and src.numel() and src.abs().max().item() > FP16_MAX:
                        raise QloraGaError(
                            f"tensor '{key}' has values beyond the fp16 range (|w| > 65504): export with --dtype bf16"
                        )
                    o = src.to(out_dtype)
                    if o.numel() and not torch.isfinite(o).all():
                        raise QloraGaError(
                            f"tensor '{key}' has non-finite values after the merge: "
                            + ("export with --dtype bf16" if fp16 else "the adapter or the base weights are broken")
                        )
                    if work is not None:
                        held += _nbytes(work)
                    if o is not t and o is not work:
                        held += _nbytes(o)
                    del work, src
                else:
                    o = t
                del t
                size = _nbytes(o)
                largest = max(largest, size)
                peak = max(peak, buffer_bytes + held)
                if buffer and buffer_bytes + size > shard_limit:
                    flush()
                buffer[key] = o.contiguous()
                buffer_bytes += size
                total += size
                peak = max(peak, buffer_bytes)
                del o
            if handle is not None:
                handle.__exit__(None, None, None)
                handle = None
            flush()
        finally:
            if handle is not None:
                handle.__exit__(None, None, None)

        n = len(shard_files)
        if n == 1:
            os.replace(tmp / shard_files[0][0], tmp / "model.safetensors")
            for k in shard_files[0][1]:
                weight_map[k] = "model.safetensors"
        else:
            for i, (name, keys) in enumerate(shard_files, 1):
                final = f"model-{i:05d}-of-{n:05d}.safetensors"
                os.replace(tmp / name, tmp / final)
                for k in keys:
                    weight_map[k] = final
            _write_json({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))},
                        tmp / "model.safetensors.index.json")

        model_config.pop("quantization_config", None)
        model_config["dtype"] = DTYPE_NAMES[out_dtype]
        if "torch_dtype" in model_config:
            model_config["torch_dtype"] = DTYPE_NAMES[out_dtype]
        _write_json(model_config, tmp / "config.json")
        for src_dir in (folder, adapter_dir):  # tokenizer files saved with the adapter win
            for name in (*TOKENIZER_FILES, GENERATION_CONFIG):
                if (src_dir / name).is_file() and not (src_dir == adapter_dir and name == GENERATION_CONFIG):
                    shutil.copy2(src_dir / name, tmp / name)
        _write_json({
            "format": "qlora-ga-merged", "adapter": str(adapter_dir), "base_model": str(base),
            "merge_base": merge_base, "dtype": DTYPE_NAMES[out_dtype],
            "quant_compute_dtype": DTYPE_NAMES.get(qdtype) if qdtype else None,
            "adapter_metadata": meta,
        }, tmp / METADATA_FILE)

    return MergeStats(
        out_dir=str(out), tensors_written=len(weight_map), tensors_merged=n_merged, tensors_dequantized=n_deq,
        shards=len(shard_files), total_bytes=total, peak_bytes=peak, largest_tensor_bytes=largest,
        dtype=DTYPE_NAMES[out_dtype], merge_base=merge_base,
    )


# ----------------------------------------------------------------------------- command line


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2 (argparse's default prints the whole usage)
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser(prog: str = "export.py") -> argparse.ArgumentParser:
    p = _Parser(prog=prog, description="Export a trained adapter: vanilla PEFT adapter, a merged 16-bit model, or a GGUF.")
    p.add_argument("--adapter", required=True, help="adapter folder (PEFT format, as written by training)")
    p.add_argument("--out", required=True, help="output folder (replaced atomically when the export succeeds)")
    p.add_argument("--merge", action="store_true", help="merge the adapter into the base and write a full model")
    p.add_argument("--gguf", default=None, metavar="TYPE",
                   help="merge, then convert with llama.cpp's converter to a GGUF (f16, bf16, q8_0 or q4_k_m) and "
                        "write an Ollama Modelfile beside it")
    p.add_argument("--llama-cpp", default=None, metavar="DIR",
                   help="llama.cpp checkout holding convert_hf_to_gguf.py; default: fetched once from the "
                        "llama-cpp-python source on PyPI into the cache")
    p.add_argument("--dtype", default=None, choices=["fp16", "bf16", "fp32"],
                   help="merged weights dtype (default fp16; bf16 for --gguf bf16)")
    p.add_argument("--merge-base", default="original", choices=["original", "dequantized"],
                   help="merge into the original 16-bit weights (default) or into deQ(Q(W)), the exact trained function")
    p.add_argument("--base", default=None, help="base model (folder, hub id or .gguf); default: the one the adapter names")
    p.add_argument("--max-shard-size", default="2GB", help="merged shard size (default 2GB)")
    return p


def main(argv=None, prog: str = "export.py") -> int:
    args = build_parser(prog).parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    quiet_libraries()
    try:
        if args.gguf is not None:
            from .gguf import gguf_export

            g = gguf_export(args.adapter, args.out, args.gguf, llama_cpp=args.llama_cpp, base=args.base,
                            merge_base=args.merge_base, dtype=args.dtype, max_shard_size=args.max_shard_size)
            print(f"GGUF {g.gguf_type} written to {g.gguf_file} ({g.bytes / 1e6:.1f} MB) with an Ollama Modelfile "
                  f"({'chat template: ' + g.chat_format if g.chat_format else 'no chat template: see the warning in it'})")
        elif args.llama_cpp is not None:
            raise QloraGaError("--llama-cpp only applies with --gguf")
        elif args.merge:
            stats = merge_export(args.adapter, args.out, base=args.base, dtype=args.dtype or "fp16",
                                 merge_base=args.merge_base, max_shard_size=args.max_shard_size)
            print(f"merged model written to {stats.out_dir}: {stats.tensors_written} tensors "
                  f"({stats.tensors_merged} merged) in {stats.shards} shard(s), {stats.total_bytes / 1e6:.1f} MB, "
                  f"peak {stats.peak_bytes / 1e6:.1f} MB held")
        else:
            if args.dtype is not None or args.merge_base != "original" or args.base:
                raise QloraGaError("--dtype, --merge-base and --base only apply with --merge or --gguf")
            out = export_adapter(args.adapter, args.out)
            print(f"adapter written to {out}")
    except QloraGaError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (OSError, MemoryError) as e:
        msg = getattr(e, "strerror", None) or str(e) or type(e).__name__
        where = getattr(e, "filename", None)
        print(f"error: {msg}{f' ({where})' if where else ''}", file=sys.stderr)
        return 2
    return 0
