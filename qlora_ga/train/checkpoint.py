"""Checkpoints: written atomically, verified before a resume, read back exactly (adapter, residual, optimizer,
scheduler, RNG, the fp16 loss scaler; the data position follows from the step)."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .. import distributed
from ..constants import ADAPTER_WEIGHTS, CHECKPOINT_RESIDUAL
from ..errors import QloraGaError
from ..fileio import atomic_dir
from ..residual import load_residual_state_dict, residual_state_dict
from .optim import follow_settings
from ..config import TrainSettings

CHECKPOINTS = "checkpoints"
#: a checkpoint's files. Its top level is a PEFT adapter folder of the model at that step (``adapter_config.json``,
#: ``adapter_model.safetensors`` with the residual folded in, ``qlora_ga.json``: what export.py, evaluate.py and
#: vanilla PEFT load); resume reads the trainable rank-r adapter and the residual from their own files.
RESUME_ADAPTER = "resume_adapter.safetensors"
RESUME_RESIDUAL = "resume_residual.safetensors"
TRAINER_STATE = "trainer_state.json"
OPTIMIZER_STATE = "state.pt"
CHECKPOINT_FORMAT = 2  # 1: adapter_model.safetensors was the trainable adapter, residual.safetensors beside it


def _rng_state():
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": random.getstate(),
    }


def _set_rng_state(st):
    torch.set_rng_state(st["torch"])
    if st.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])
    random.setstate(st["python"])


def save_checkpoint(model, optimizer, scheduler, step: int, out_dir: Path, extra: dict | None = None,
                    scaler=None, keep: int | None = None) -> Path:
    """Write ``checkpoints/step-N`` atomically (:func:`~qlora_ga.fileio.atomic_dir`, fsynced): the PEFT adapter of
    the step, the trainable weights and residual, optimizer, scheduler, RNG, and the fp16 loss scaler's state
    (scale and growth tracker) when it is in use; ``trainer_state.json`` lists every file with its size.
    ``keep``: then delete all but the newest ``keep`` checkpoints (``--save-total-limit``).

    With several processes every one calls this: their RNG states are gathered (one list, by rank)
    and the main process writes; all return once the checkpoint is complete.
    """
    rngs = distributed.gather_objects(_rng_state())
    root = Path(out_dir) / CHECKPOINTS
    final = root / f"step-{step}"
    if not distributed.is_main():
        distributed.barrier()
        return final
    with atomic_dir(final) as tmp:
        _write_checkpoint(tmp, model, optimizer, scheduler, step, rngs, extra, scaler)
    if keep:
        for _, old in checkpoint_folders(root)[keep:]:
            shutil.rmtree(old, ignore_errors=True)
    distributed.barrier()
    return final


def _write_checkpoint(tmp: Path, model, optimizer, scheduler, step: int, rngs: list, extra: dict | None, scaler) -> None:
    from peft import get_peft_model_state_dict

    from ..export import save_adapter

    save_adapter(model, tmp, metadata={"checkpoint_step": step})  # (replaces the empty tmp folder by the adapter's)
    save_file({k: v.detach().contiguous() for k, v in get_peft_model_state_dict(model).items()}, tmp / RESUME_ADAPTER)
    res = residual_state_dict(model)
    if res:
        save_file(res, tmp / RESUME_RESIDUAL)
    state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
             "rng": rngs[0] if len(rngs) == 1 else rngs}
    if scaler is not None and scaler.is_enabled():
        state["scaler"] = scaler.state_dict()
    torch.save(state, tmp / OPTIMIZER_STATE)
    files = {p.name: p.stat().st_size for p in sorted(tmp.iterdir()) if p.is_file()}
    (tmp / TRAINER_STATE).write_text(json.dumps({"step": step, "world_size": len(rngs), "format": CHECKPOINT_FORMAT,
                                                 "files": files, **(extra or {})}, indent=1))


def checkpoint_folders(root: Path) -> list[tuple[int, Path]]:
    """``(step, folder)`` of every ``step-N`` folder under ``root``, newest first (complete or not: a resume
    verifies them, :func:`checkpoint_problem`)."""
    if not Path(root).is_dir():
        return []
    found = []
    for p in Path(root).glob("step-*"):
        step = p.name.split("-", 1)[1]
        if step.isdigit() and p.is_dir():
            found.append((int(step), p))
    return sorted(found, reverse=True)


def read_trainer_state(ckpt: Path) -> dict:
    """A checkpoint's ``trainer_state.json`` (one-line error when it is not readable)."""
    if not (Path(ckpt) / TRAINER_STATE).is_file():
        raise QloraGaError(f"{Path(ckpt) / TRAINER_STATE} is missing: resume from an earlier checkpoint")
    try:
        st = json.loads((Path(ckpt) / TRAINER_STATE).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise QloraGaError(f"{Path(ckpt) / TRAINER_STATE} is damaged ({type(e).__name__}): resume from an earlier checkpoint") from None
    if not isinstance(st, dict) or not isinstance(st.get("step"), int):
        raise QloraGaError(f"{Path(ckpt) / TRAINER_STATE} has no step number: resume from an earlier checkpoint")
    return st


def _safetensors_problem(path: Path) -> str | None:
    """Why ``path`` is not a complete safetensors file (its header read, its data length checked), or None."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if size < 8 or n > size - 8:
                return f"{path.name} is truncated"
            header = json.loads(f.read(n))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return f"{path.name} is not a safetensors file"
    return None if 8 + n + end == size else f"{path.name} is truncated"


def checkpoint_problem(ckpt: Path, expect_residual: bool = False) -> str | None:
    """Why the checkpoint ``ckpt`` cannot be resumed (a missing, truncated or unreadable file), or None.

    Format 2 lists its files with their sizes; format 1 has none, so its required files are checked and
    ``expect_residual`` (the run's init puts a residual in every target) asks for its residual file."""
    if not (ckpt / TRAINER_STATE).is_file():
        return f"{TRAINER_STATE} is missing"
    try:
        st = read_trainer_state(ckpt)
    except QloraGaError as e:
        return str(e).split(": resume")[0]
    files = st.get("files")
    if isinstance(files, dict):
        required = files
    else:  # format 1
        required = dict.fromkeys([ADAPTER_WEIGHTS, OPTIMIZER_STATE] + ([CHECKPOINT_RESIDUAL] if expect_residual else []))
    for name, size in required.items():
        p = ckpt / name
        if not p.is_file():
            return f"{name} is missing"
        if size is not None and p.stat().st_size != size:
            return f"{name} has {p.stat().st_size} bytes, {size} were written"
        if name.endswith(".safetensors") and (why := _safetensors_problem(p)):
            return why
    try:
        torch.load(ckpt / OPTIMIZER_STATE, weights_only=False, map_location="cpu")
    except Exception as e:  # noqa: BLE001 - a damaged pickle/zip raises many kinds
        return f"{OPTIMIZER_STATE} is unreadable ({type(e).__name__})"
    return None


def find_checkpoint(out_dir: Path, resume: str, expect_residual: bool = False, say=None) -> Path:
    """The checkpoint to resume: ``resume`` itself when it is a path, else the newest complete one under
    ``out_dir/checkpoints`` (a damaged newer one is skipped, with a line through ``say``)."""
    if resume and resume != "latest":
        p = Path(resume)
        if not (p / TRAINER_STATE).is_file():
            raise QloraGaError(f"'{resume}' is not a checkpoint folder (no trainer_state.json): pass checkpoints/step-N of a run, or --resume alone")
        if why := checkpoint_problem(p, expect_residual):
            raise QloraGaError(f"checkpoint {p} is damaged ({why}): resume from another checkpoint")
        return p
    root = Path(out_dir) / CHECKPOINTS
    found = checkpoint_folders(root)
    if not found:
        raise QloraGaError(f"no checkpoint to resume in {root}: run without --resume, or point --resume at a checkpoint")
    for i, (_, p) in enumerate(found):
        why = checkpoint_problem(p, expect_residual)
        if why is None:
            return p
        if say is not None:
            nxt = f"trying {found[i + 1][1].name}" if i + 1 < len(found) else "no earlier checkpoint"
            say(f"checkpoint {p.name} is damaged ({why}): {nxt}")
    raise QloraGaError(f"every checkpoint in {root} is damaged (the newest: {checkpoint_problem(found[0][1], expect_residual)}): "
                       "start the run again without --resume")


def checkpoint_adapter_file(ckpt: Path) -> Path:
    """The trainable rank-r adapter of a checkpoint (its file in either format)."""
    return ckpt / (RESUME_ADAPTER if (ckpt / RESUME_ADAPTER).is_file() else ADAPTER_WEIGHTS)


def load_checkpoint_weights(model, ckpt: Path):
    """Trainable LoRA weights and residual of a checkpoint into a freshly wrapped PEFT model, strictly: a tensor the
    model lacks, or an adapter or residual tensor the checkpoint lacks, is a one-line error."""
    from peft import set_peft_model_state_dict

    ckpt = Path(ckpt)
    sd = load_file(checkpoint_adapter_file(ckpt))
    result = set_peft_model_state_dict(model, sd)
    missing = [k for k in result.missing_keys if "lora_" in k]
    unexpected = list(result.unexpected_keys)
    what = (f"{len(missing)} adapter tensor(s) missing (e.g. {missing[0]})" if missing else
            f"{len(unexpected)} tensor(s) the model has no place for (e.g. {unexpected[0]})" if unexpected else None)
    res_file = ckpt / (RESUME_RESIDUAL if (ckpt / RESUME_ADAPTER).is_file() else CHECKPOINT_RESIDUAL)
    if what is None and res_file.is_file():
        try:
            load_residual_state_dict(model, load_file(res_file))
        except (KeyError, AttributeError) as e:
            what = f"its residual has no place in the model ({str(e).strip(chr(39))})"
    if what is not None:
        raise QloraGaError(f"checkpoint {ckpt} does not fit the model: {what}; resume with the run's own --model and "
                           "--target-modules")


def load_training_state(checkpoint: Path, optimizer, scheduler, scaler, s: TrainSettings, world: int) -> None:
    """Resume a checkpoint's optimizer, scheduler (following the settings of ``s``), this process's RNG and the fp16
    loss scaler into freshly built ones (the weights are loaded already: :func:`load_checkpoint_weights`)."""
    # on the CPU first (a GPU checkpoint resumes anywhere); the optimizer moves its state to the parameters
    try:
        st = torch.load(checkpoint / OPTIMIZER_STATE, weights_only=False, map_location="cpu")
    except Exception as e:  # noqa: BLE001 - (find_checkpoint verified it; a file changed since)
        raise QloraGaError(f"{checkpoint / OPTIMIZER_STATE} is unreadable ({type(e).__name__}): resume from an earlier checkpoint") from None
    optimizer.load_state_dict(st["optimizer"])
    scheduler.load_state_dict(st["scheduler"])
    follow_settings(optimizer, scheduler, s)
    rng = st["rng"] if isinstance(st["rng"], list) else [st["rng"]]  # one state per process that wrote it
    if len(rng) != world:
        raise QloraGaError(
            f"checkpoint {checkpoint} was written by {len(rng)} process(es), this run has {world}: the data order and "
            f"batch depend on it; resume with {len(rng)} process(es)"
        )
    _set_rng_state(rng[distributed.rank()])
    if scaler.is_enabled() and "scaler" in st:
        scaler.load_state_dict(st["scaler"])
