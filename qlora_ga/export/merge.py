"""The merged export (docs/DESIGN.md section 6): the adapter added into its base, written as a plain 16/32-bit checkpoint.

For every LoRA target weight ``W`` the output holds ``W_base + s * (B' @ A')`` (merge math in fp32,
then a cast to fp16/bf16/fp32), written as sharded safetensors with ``model.safetensors.index.json``
(one ``model.safetensors`` when it fits in one shard, exactly like ``save_pretrained``),
``config.json`` without ``quantization_config``, the tokenizer files and ``generation_config.json``.
The base is read ONE tensor at a time from its 16-bit safetensors shards and output tensors are
buffered only until their shard is complete, so host memory stays near one shard whatever the
model size.

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

Which tensor goes to which shard is ``huggingface_hub``'s split (the one ``save_pretrained`` uses),
computed from the sizes in the shard headers before any weight is read; the writing stays ours,
because ``save_pretrained`` / ``save_torch_state_dict`` need the whole state dict in memory.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..errors import QloraGaError
from ..fileio import atomic_dir
from .adapter import LORA_KEY, config_scaling, load_adapter_dir, module_key
from .base import BaseTensor, ShardReader, base_tensors, quantized_weight_names, resolve_base_folder
from .files import (
    GENERATION_CONFIG,
    MERGE_BASES,
    METADATA_FILE,
    TOKENIZER_FILES,
    check_out_dir,
    check_out_not_over,
    copy_present,
    parse_size,
    save_safetensors,
    write_json,
)

DTYPES = {
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp32": torch.float32, "float32": torch.float32, "float": torch.float32,
}
DTYPE_NAMES = {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32"}
FP16_MAX = 65504.0


def parse_dtype(dtype) -> torch.dtype:
    """``"fp16"``, ``"bfloat16"``, ``torch.float32`` ... -> the torch dtype (fp16, bf16 or fp32 only)."""
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPE_NAMES:
            raise QloraGaError(f"unsupported dtype {dtype}: use fp16, bf16 or fp32")
        return dtype
    d = DTYPES.get(str(dtype).lower().removeprefix("torch."))
    if d is None:
        raise QloraGaError(f"unknown dtype '{dtype}': use fp16, bf16 or fp32")
    return d


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


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


# ----------------------------------------------------------------------------- the export, step by step


def merge_export(
    adapter_dir,
    out_dir,
    base: str | None = None,
    dtype="fp16",
    merge_base: str = "original",
    max_shard_size="2GB",
    quant_compute_dtype=None,
    *,
    overwrite: bool | None = None,
) -> MergeStats:
    """Merge an adapter into its base and write a plain 16/32-bit checkpoint (see the module docstring).

    ``base``: local folder, hub id (resolved in the HF cache; offline when ``HF_HUB_OFFLINE=1``) or
    ``.gguf`` file; default: ``base_model`` of ``qlora_ga.json``, else the adapter config's
    ``base_model_name_or_path``. ``dtype``: output dtype of floating tensors. ``merge_base``:
    ``"original"`` or ``"dequantized"``. ``max_shard_size``: shard size (``"2GB"``, bytes...).
    ``quant_compute_dtype``: dtype the 4-bit loader quantized from (default: recorded in
    ``qlora_ga.json``, else fp32); the quantization runs on the device type recorded there (CUDA
    when the model was trained on a GPU and CUDA is available here), else on the CPU.
    ``out_dir`` may not be, hold or lie inside the adapter or the base folder. ``overwrite``: ``None``
    replaces an existing ``out_dir`` whatever it holds (the caller owns it, e.g. finetune.py's run folder);
    ``False`` / ``True`` apply the command line's rule (:func:`~qlora_ga.export.files.check_out_dir`: only an
    earlier merged export, and only with ``True``).
    Returns :class:`MergeStats`.
    """
    out_dtype = parse_dtype(dtype)
    if merge_base not in MERGE_BASES:
        raise QloraGaError(f"unknown merge base '{merge_base}': use 'original' or 'dequantized'")
    shard_limit = parse_size(max_shard_size)
    adapter_dir = Path(adapter_dir).expanduser()
    out = Path(out_dir).expanduser().absolute()
    config, sd, meta = load_adapter_dir(adapter_dir)
    deltas = lora_deltas(config, sd)
    base = base or (meta or {}).get("base_model") or config.base_model_name_or_path
    folder, model_config = _base_checkpoint(base, out, adapter_dir)
    if overwrite is not None:
        check_out_dir(out, "merged", overwrite)
    tensors = base_tensors(folder)
    _require_targets(base, deltas, tensors)
    merge = _Merge(deltas, out_dtype, bool(getattr(config, "fan_in_fan_out", False)),
                   *_dequantized_weights(merge_base, folder, meta, deltas, set(tensors), quant_compute_dtype))
    split = _shard_plan(tensors, out_dtype, shard_limit)
    with atomic_dir(out) as tmp:
        peak, largest = _write_shards(split, tensors, merge, tmp)
        _write_model_files(tmp, folder, adapter_dir, model_config, out_dtype, {
            "format": "qlora-ga-merged", "adapter": str(adapter_dir), "base_model": str(base),
            "merge_base": merge_base, "dtype": DTYPE_NAMES[out_dtype],
            "quant_compute_dtype": DTYPE_NAMES.get(merge.qdtype) if merge.qdtype else None,
            "adapter_metadata": meta,
        })
    return MergeStats(
        out_dir=str(out), tensors_written=len(split.tensor_to_filename), tensors_merged=merge.merged,
        tensors_dequantized=merge.dequantized, shards=len(split.filename_to_tensors),
        total_bytes=split.metadata["total_size"], peak_bytes=peak, largest_tensor_bytes=largest,
        dtype=DTYPE_NAMES[out_dtype], merge_base=merge_base,
    )


def lora_deltas(config, sd: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """``{<module>.weight: (B, A, s)}`` of a plain LoRA-on-linear adapter; anything else is refused."""
    if getattr(config, "use_dora", False):
        raise QloraGaError("the adapter uses DoRA, which the merged export does not support: export the adapter instead")
    lora: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in sd.items():
        m = LORA_KEY.match(key)
        if not m:
            raise QloraGaError(
                f"adapter tensor '{key}' is not a LoRA linear weight: the merged export supports plain LoRA on "
                "linear layers only (no modules_to_save, embeddings or LoRA biases)"
            )
        lora.setdefault(module_key(m.group("module")), {})[m.group("which")] = t
    deltas = {}
    for mod, ab in lora.items():
        if set(ab) != {"A", "B"}:
            raise QloraGaError(f"adapter module '{mod}' lacks its lora_{'A' if 'A' not in ab else 'B'} weight: the adapter is incomplete")
        r, s = config_scaling(config, mod)
        if ab["A"].shape[0] != r or ab["B"].shape[1] != r:
            raise QloraGaError(
                f"adapter module '{mod}' has rank {ab['A'].shape[0]} but its config says {r}: the adapter files do not match"
            )
        deltas[f"{mod}.weight"] = (ab["B"], ab["A"], s)
    return deltas


def _base_checkpoint(base, out: Path, adapter_dir: Path) -> tuple[Path, dict]:
    """The base's local folder and its ``config.json``; a quantized or missing base is refused."""
    if not base:
        raise QloraGaError("the adapter does not say which base model it belongs to: pass --base")
    folder = resolve_base_folder(str(base))
    check_out_not_over(out, {"adapter": adapter_dir, "base model": folder})
    if not (folder / "config.json").is_file():
        raise QloraGaError(f"base '{folder}' has no config.json: pass the base model folder with --base")
    model_config = json.loads((folder / "config.json").read_text())
    if model_config.get("quantization_config"):
        raise QloraGaError(
            f"base '{base}' is a quantized checkpoint: merge into the original 16-bit model (pass it with --base)"
        )
    return folder, model_config


def _require_targets(base, deltas, tensors) -> None:
    missing = sorted(set(deltas) - set(tensors))
    if missing:
        raise QloraGaError(
            f"base '{base}' has no tensor '{missing[0]}' that the adapter modifies ({len(missing)} missing): "
            "the adapter was trained on a different model"
        )


def _dequantized_weights(merge_base, folder, meta, deltas, present: set[str], quant_compute_dtype):
    """``(names, compute dtype, device)`` of the weights that become ``deQ(Q(W))`` (no names for 'original')."""
    qinfo = (meta or {}).get("quantization") or {}
    qdevice = qinfo.get("device") or "cpu"
    if merge_base != "dequantized":
        return set(), None, qdevice
    qdtype = parse_dtype(quant_compute_dtype or qinfo.get("compute_dtype") or "fp32")
    return quantized_weight_names(folder, meta, set(deltas)) & present | set(deltas), qdtype, qdevice


def _shard_plan(tensors: dict[str, BaseTensor], out_dtype: torch.dtype, limit: int):
    """Which output file holds which tensor (``huggingface_hub.StateDictSplit``), from the output sizes alone."""
    from huggingface_hub import split_state_dict_into_shards_factory

    sizes = {k: math.prod(t.shape) * (out_dtype if t.dtype.is_floating_point else t.dtype).itemsize
             for k, t in tensors.items()}
    return split_state_dict_into_shards_factory(sizes, get_storage_size=int, max_shard_size=limit,
                                                filename_pattern="model{suffix}.safetensors")


def _write_shards(split, tensors: dict[str, BaseTensor], merge: _Merge, tmp: Path) -> tuple[int, int]:
    """Read, merge and buffer the tensors of one output file at a time, then write it; ``(peak, largest)`` bytes."""
    peak = largest = 0
    with ShardReader() as reader:
        for filename, keys in split.filename_to_tensors.items():
            buffer, buffered = {}, 0
            for key in keys:
                o, held = merge(key, reader.read(tensors[key].shard, key))
                peak = max(peak, buffered + held)
                buffer[key] = o.contiguous()
                buffered += _nbytes(o)
                largest = max(largest, _nbytes(o))
                del o
            peak = max(peak, buffered)
            save_safetensors(buffer, tmp / filename)
            del buffer
    if split.is_sharded:
        write_json({"metadata": split.metadata, "weight_map": dict(sorted(split.tensor_to_filename.items()))},
                   tmp / "model.safetensors.index.json")
    return peak, largest


def _write_model_files(tmp: Path, folder: Path, adapter_dir: Path, model_config: dict, out_dtype, record: dict):
    """``config.json`` (16/32-bit, no quantization), tokenizer + generation config, and the ``qlora_ga.json`` record."""
    model_config = dict(model_config)
    model_config.pop("quantization_config", None)
    model_config["dtype"] = DTYPE_NAMES[out_dtype]
    if "torch_dtype" in model_config:
        model_config["torch_dtype"] = DTYPE_NAMES[out_dtype]
    write_json(model_config, tmp / "config.json")
    copy_present(folder, tmp, (*TOKENIZER_FILES, GENERATION_CONFIG))
    copy_present(adapter_dir, tmp, TOKENIZER_FILES)  # tokenizer files saved with the adapter win
    write_json(record, tmp / METADATA_FILE)


# ----------------------------------------------------------------------------- the per-tensor step


@dataclass
class _Merge:
    """``W -> cast(W_base + s * B @ A)`` for one base tensor; counts what it merged and dequantized."""

    deltas: dict[str, tuple[torch.Tensor, torch.Tensor, float]]
    out_dtype: torch.dtype
    fan_in_fan_out: bool
    quantized: set[str]
    qdtype: torch.dtype | None
    qdevice: str
    merged: int = 0
    dequantized: int = 0

    def __call__(self, key: str, t: torch.Tensor) -> tuple[torch.Tensor, int]:
        """The output tensor and the bytes held to make it (input, fp32 work copy, update, cast)."""
        if not t.is_floating_point():
            return t, _nbytes(t)
        held = _nbytes(t)
        work = None
        if key in self.quantized:
            work = _quantize_roundtrip(t, self.qdtype, self.qdevice)
            self.dequantized += 1
        if key in self.deltas:
            if work is None:
                work = t.to(torch.float32, copy=True)  # never modify the tensor read in place
            held += self._add_update(key, work)
            self.merged += 1
        o = self._cast(key, work if work is not None else t)
        if work is not None:
            held += _nbytes(work)
        if o is not t and o is not work:
            held += _nbytes(o)
        return o, held

    def _add_update(self, key: str, work: torch.Tensor) -> int:
        """``work += s * B @ A`` in place; the bytes of the update."""
        B, A, s = self.deltas[key]
        delta = B.float() @ A.float()
        if self.fan_in_fan_out:
            delta = delta.T
        if delta.shape != work.shape:
            raise QloraGaError(
                f"adapter update for '{key}' has shape {tuple(delta.shape)} but the base weight is "
                f"{tuple(work.shape)}: the adapter was trained on a different model"
            )
        work.add_(delta, alpha=s)
        return _nbytes(delta)

    def _cast(self, key: str, src: torch.Tensor) -> torch.Tensor:
        fp16 = self.out_dtype == torch.float16
        if fp16 and src.numel() and src.abs().max().item() > FP16_MAX:
            raise QloraGaError(f"tensor '{key}' has values beyond the fp16 range (|w| > 65504): export with --dtype bf16")
        o = src.to(self.out_dtype)
        if o.numel() and not torch.isfinite(o).all():
            raise QloraGaError(
                f"tensor '{key}' has non-finite values after the merge: "
                + ("export with --dtype bf16" if fp16 else "the adapter or the base weights are broken")
            )
        return o


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
