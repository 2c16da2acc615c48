"""The adapter export (docs/DESIGN.md section 6): vanilla PEFT files, the frozen residual folded in, and loading one back.

:func:`save_adapter` / :func:`export_adapter` write ``adapter_config.json`` +
``adapter_model.safetensors`` that plain ``peft.PeftModel.from_pretrained(base_4bit, out_dir)``
loads and that reproduce the trained model's logits. A layer that carries the frozen LoRA-GA
residual (``qlora_ga/residual.py``) computes ``base(x) + s * (B A x - B0 A0 x)``; vanilla PEFT has
no such term, so the residual is folded into a LoRA of twice the rank: ``A' = [A; A0]`` (2r x n)
and ``B' = [B, -B0]`` (m x 2r), because ``B' A' = B A - B0 A0`` exactly. Rank r is not enough:
``B A - B0 A0`` is a difference of two independent rank-r products and has rank up to 2r in
general, so no rank-r pair can hold it without an approximation (an SVD truncation would change
the function). The exported config says ``r = 2r`` and keeps the trained ``use_rslora`` flag with
``lora_alpha`` chosen so that PEFT's scaling equals the trained ``s`` (``alpha = s * sqrt(2r)``
with rsLoRA, ``s * 2r`` without); layers whose (rank, scaling) differ from the most common one get
exact per-module entries in ``rank_pattern`` / ``alpha_pattern``. Loaded in vanilla PEFT, the
``A0``/``B0`` half is an ordinary (trainable) part of the LoRA; for inference this changes nothing.

Next to it, ``qlora_ga.json`` records the method metadata (trained rank, scaling, whether a
residual was folded, the base model source, which weights the 4-bit loader quantized and in
which dtype). It is read when present (e.g. by the merge to find the base), but the adapter never
needs it. :func:`load_adapter_dir` reads an adapter folder back (weights through
``peft.load_peft_weights``), folding a residual file of a training checkpoint when present.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import re
from collections import Counter
from pathlib import Path

import torch

from ..constants import ADAPTER_WEIGHTS, PEFT_PREFIX
from ..errors import QloraGaError
from ..fileio import atomic_dir
from ..arch import unwrap
from .files import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS_BIN,
    METADATA_FILE,
    RESIDUAL_FILE,
    RESIDUAL_FILES,
    TOKENIZER_FILES,
    check_adapter_dir,
    check_out_dir,
    check_out_not_over,
    copy_present,
    read_metadata,
    save_safetensors,
    write_json,
)

LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<which>A|B)\.weight$")


# ----------------------------------------------------------------------------- names and scalings


def drop_internal(sd: dict) -> dict:
    """Drop entries of qlora_ga's private attributes (``._qlora_ga_*``) that leak into PEFT state dicts."""
    return {k: v for k, v in sd.items() if "._qlora_ga_" not in k and not k.startswith("_qlora_ga_")}


def module_key(peft_name: str) -> str:
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


def _lora_ranks(sd: dict[str, torch.Tensor]) -> dict[str, int]:
    """``{<module>: rank}`` of every LoRA (linear or embedding) in a PEFT state dict."""
    ranks = {}
    for key, t in sd.items():
        m = LORA_KEY.match(key)
        if m and m.group("which") == "A":
            ranks[module_key(m.group("module"))] = t.shape[0]
        elif ".lora_embedding_A" in key:
            ranks[module_key(key.split(".lora_embedding_A")[0])] = t.shape[0]
    return ranks


def _config_scalings(config, sd: dict[str, torch.Tensor]) -> dict[str, float]:
    """``{<module>: s}`` that ``config`` gives each LoRA linear of ``sd``."""
    scalings = {}
    for key in sd:
        m = LORA_KEY.match(key)
        if m and m.group("which") == "A":
            mod = module_key(m.group("module"))
            scalings[mod] = config_scaling(config, mod)[1]
    return scalings


# ----------------------------------------------------------------------------- the residual fold


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
    new_rank = _lora_ranks(sd)
    unknown = sorted(set(residuals) - set(new_rank))
    if unknown:
        raise QloraGaError(f"residual for '{unknown[0]}' has no LoRA weights in the adapter: the residual does not belong to it")
    given = scalings or {}
    scalings = {mod: given[mod] if mod in given else config_scaling(config, mod)[1] for mod in new_rank}
    for mod, (a0, b0) in residuals.items():
        ka, kb = f"{PEFT_PREFIX}{mod}.lora_A.weight", f"{PEFT_PREFIX}{mod}.lora_B.weight"
        sd[ka], sd[kb] = _stack(mod, sd[ka], sd[kb], a0, b0)
        new_rank[mod] = sd[ka].shape[0]
    return sd, _folded_config(config, {mod: (new_rank[mod], scalings[mod]) for mod in new_rank})


def _stack(mod: str, A: torch.Tensor, B: torch.Tensor, a0: torch.Tensor, b0: torch.Tensor):
    """``([A; A0], [B, -B0])`` in their common dtype."""
    if a0.shape[1] != A.shape[1] or b0.shape[0] != B.shape[0] or a0.shape[0] != b0.shape[1]:
        raise QloraGaError(
            f"residual of '{mod}' has shapes A0 {tuple(a0.shape)}, B0 {tuple(b0.shape)} that do not fit "
            f"A {tuple(A.shape)}, B {tuple(B.shape)}"
        )
    dt = torch.promote_types(A.dtype, a0.dtype)
    return (torch.cat([A.to(dt), a0.to(device=A.device, dtype=dt)], dim=0).contiguous(),
            torch.cat([B.to(dt), -b0.to(device=B.device, dtype=dt)], dim=1).contiguous())


def _folded_config(config, pairs: dict[str, tuple[int, float]]):
    """A copy of ``config`` whose rank / alpha (and per-module patterns) give each module its ``(rank, s)``."""
    cfg = copy.deepcopy(config)
    rslora = bool(cfg.use_rslora)

    def alpha_for(r, s):
        return s * math.sqrt(r) if rslora else s * r

    (r_def, s_def), _ = Counter(pairs.values()).most_common(1)[0]
    a_def = alpha_for(r_def, s_def)
    if float(a_def).is_integer():
        a_def = int(a_def)
    cfg.r, cfg.lora_alpha = r_def, a_def
    cfg.rank_pattern = {mod: r for mod, (r, s) in sorted(pairs.items()) if r != r_def}
    cfg.alpha_pattern = {mod: alpha_for(r, s) for mod, (r, s) in sorted(pairs.items()) if (r, s) != (r_def, s_def)}
    # Weights are loaded from the file; an init that rewrites the base (pissa, olora, ...) must not run.
    cfg.init_lora_weights = True
    return cfg


# ----------------------------------------------------------------------------- writing an adapter


def adapter_metadata(config, *, trained_rank, scalings: dict[str, float], residual_modules, base, extra=None,
                     exported_rank=None) -> dict:
    """The ``qlora_ga.json`` of an adapter export."""
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


def _quantization_record(base_model) -> dict:
    """Which weights the 4-bit loader quantized, from which dtype, on which device (``{}`` without 4-bit layers)."""
    import bitsandbytes as bnb

    quantized, quant_dtype, quant_device = [], None, None
    for name, mod in base_model.named_modules():
        if isinstance(mod, bnb.nn.Linear4bit):
            quantized.append(name.removesuffix(".base_layer") + ".weight")
            qs = getattr(mod.weight, "quant_state", None)
            if qs is not None and quant_dtype is None:
                quant_dtype = str(qs.dtype).removeprefix("torch.")
                quant_device = mod.weight.device.type
    if not quantized:
        return {}
    return {"quantization": {"quant_type": "nf4", "double_quant": True, "blocksize": 64,
                             "compute_dtype": quant_dtype, "device": quant_device, "quantized_weights": quantized}}


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
    from peft import get_peft_model_state_dict

    from ..residual import iter_residuals

    if adapter_name not in getattr(peft_model, "peft_config", {}):
        raise QloraGaError(f"the model has no adapter named '{adapter_name}': pass a PeftModel with that adapter")
    config = peft_model.peft_config[adapter_name]
    lora_state = get_peft_model_state_dict(peft_model, adapter_name=adapter_name)
    lora_state = {k: v.detach().to("cpu").clone() for k, v in drop_internal(lora_state).items()}

    residuals, scalings = {}, {}
    for name, mod in peft_model.named_modules():
        sc = getattr(mod, "scaling", None)
        if isinstance(sc, dict) and adapter_name in sc and hasattr(mod, "lora_A"):
            scalings[module_key(name)] = float(sc[adapter_name])
    for name, layer, a0, b0 in iter_residuals(peft_model):
        if adapter_name in getattr(layer, "lora_A", {}):
            residuals[module_key(name)] = (a0.detach().cpu(), b0.detach().cpu())

    base_model = unwrap(peft_model)
    # the name the user gave (hub id, folder or .gguf file), portable across machines; the merge resolves it again
    source = (getattr(base_model, "qlora_ga_name", None) or getattr(base_model, "qlora_ga_source", None)
              or config.base_model_name_or_path)
    extra = {**_quantization_record(base_model), **(metadata or {})}

    sd, cfg = fold_residuals(lora_state, config, residuals, scalings)
    if not residuals:
        cfg = copy.deepcopy(config)  # unchanged, exactly like save_pretrained
    if source is not None:
        cfg.base_model_name_or_path = str(source)
    meta = adapter_metadata(config, trained_rank=int(config.r), scalings=scalings, residual_modules=list(residuals),
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
        save_safetensors(sd, tmp / ADAPTER_WEIGHTS)
        write_json(meta, tmp / METADATA_FILE)
        if copy_from is not None:
            copy_present(copy_from, tmp, (*TOKENIZER_FILES, "README.md"))
    return Path(out_dir)


# ----------------------------------------------------------------------------- reading an adapter


def load_adapter_dir(adapter_dir) -> tuple:
    """``(config, state_dict, metadata)`` of an adapter folder, residual file folded in when present."""
    d = Path(adapter_dir).expanduser()
    config = _read_lora_config(d)
    sd = drop_internal(_read_weights(d))
    meta = read_metadata(d)
    res_file = next((d / n for n in RESIDUAL_FILES if (d / n).is_file()), None)
    if res_file is not None:
        if meta and meta.get("residual_folded"):
            raise QloraGaError(f"'{d}' has both a folded adapter and {res_file.name}: remove one of them")
        config, sd, meta = _fold_residual_file(res_file, config, sd, meta)
    elif meta and meta.get("has_residual") and not meta.get("residual_folded"):
        raise QloraGaError(f"'{d}' was trained with a residual but {RESIDUAL_FILE} is missing: the adapter alone is not the trained model")
    return config, sd, meta


def _read_lora_config(d: Path):
    from peft import LoraConfig

    check_adapter_dir(d)
    try:
        config = LoraConfig.from_pretrained(str(d))
    except (TypeError, ValueError, json.JSONDecodeError) as e:
        raise QloraGaError(f"cannot read {d / ADAPTER_CONFIG}: {str(e).splitlines()[0] if str(e) else e}") from None
    if str(getattr(config, "peft_type", "LORA")).split(".")[-1].upper() != "LORA":
        raise QloraGaError(f"'{d}' holds a {config.peft_type} adapter: only LoRA adapters can be exported")
    return config


def _read_weights(d: Path) -> dict[str, torch.Tensor]:
    """The adapter weights (safetensors, else the legacy ``.bin``) on the CPU, through ``peft.load_peft_weights``."""
    from peft.utils import load_peft_weights

    if not (d / ADAPTER_WEIGHTS).is_file() and not (d / ADAPTER_WEIGHTS_BIN).is_file():
        # checked here: load_peft_weights would go looking for the folder's name on the Hub
        raise QloraGaError(f"'{d}' has no {ADAPTER_WEIGHTS}: the adapter weights are missing")
    with unreadable_as_error(d / ADAPTER_WEIGHTS if (d / ADAPTER_WEIGHTS).is_file() else d / ADAPTER_WEIGHTS_BIN):
        return load_peft_weights(str(d), device="cpu")


@contextlib.contextmanager
def unreadable_as_error(path: Path):
    """A truncated or corrupt weights file read inside the block becomes a one-line :class:`QloraGaError` naming it."""
    import pickle

    from safetensors import SafetensorError

    broken = (SafetensorError,) if path.suffix == ".safetensors" else (pickle.UnpicklingError, EOFError, RuntimeError)
    try:
        yield
    except broken as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise QloraGaError(f"'{path}' is truncated or corrupt ({first}): export or copy it again") from None


def _fold_residual_file(res_file: Path, config, sd, meta):
    """Fold a training checkpoint's residual file into the adapter: ``(config, state_dict, metadata)`` of rank 2r."""
    from safetensors.torch import load_file

    from ..residual import A0_NAME, B0_NAME

    with unreadable_as_error(res_file):
        rsd = load_file(str(res_file))
    residuals = {}
    for key in rsd:
        mod = key.rsplit(".", 1)[0]
        residuals[module_key(mod)] = (rsd[f"{mod}.{A0_NAME}"], rsd[f"{mod}.{B0_NAME}"])
    scalings = _config_scalings(config, sd)
    sd, new_cfg = fold_residuals(sd, config, residuals, scalings)
    meta = {**(meta or {}), **adapter_metadata(
        config, trained_rank=int(config.r), scalings=scalings, residual_modules=list(residuals),
        base=(meta or {}).get("base_model") or config.base_model_name_or_path, exported_rank=int(new_cfg.r))}
    return new_cfg, sd, meta


def export_adapter(adapter_dir, out_dir, *, overwrite: bool | None = None) -> Path:
    """Re-save an adapter folder in vanilla PEFT format (folding a ``qlora_ga_residual.safetensors``).

    ``out_dir`` may not be, hold or lie inside ``adapter_dir``. ``overwrite``: ``None`` replaces an
    existing ``out_dir`` whatever it holds (the caller owns it); ``False`` / ``True`` apply the command
    line's rule (:func:`~qlora_ga.export.files.check_out_dir`: only an earlier adapter export, and only with ``True``).
    """
    src = Path(adapter_dir).expanduser()
    check_out_not_over(out_dir, {"adapter": src})
    if overwrite is not None:
        check_out_dir(out_dir, "adapter", overwrite)
    config, sd, meta = load_adapter_dir(src)
    if meta is None:
        meta = adapter_metadata(config, trained_rank=int(config.r), scalings=_config_scalings(config, sd),
                                residual_modules=[], base=config.base_model_name_or_path)
    return _write_adapter(out_dir, sd, config, meta, copy_from=src)
