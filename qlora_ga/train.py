"""Step 4 of the pipeline: adapter training (docs/DESIGN.md section 5), in one readable loop.

bitsandbytes paged AdamW (32-bit default, 8-bit option; torch AdamW on CPU), LoRA-One's
preconditioned AdamW as an option, gradient checkpointing, bf16/fp16 autocast on GPU, gradient
accumulation with a token-weighted loss, warmup + cosine (transformers), grad-norm clipping, eval
loss every N steps, metrics JSONL, and atomic checkpoints that resume exactly (adapter, residual,
optimizer, scheduler, RNG; the data position follows from the step).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from . import distributed
from .compile import compile_stats, compiled
from .fused import describe as describe_fused, fused
from .constants import ADAPTER_WEIGHTS, CHECKPOINT_RESIDUAL
from .data.batch import collate, count_label_tokens
from .data.packing import model_inputs
from .errors import QloraGaError
from .fileio import atomic_dir
from .metrics import MetricsLogger
from .residual import load_residual_state_dict, residual_state_dict

CHECKPOINTS = "checkpoints"


@dataclass
class TrainSettings:
    batch_size: int = 4
    grad_accum: int = 4
    lr: float = 5e-5
    epochs: float = 1.0
    max_steps: int = -1
    warmup: float = 0.03
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    optim: str = "paged_adamw_32bit"
    seed: int = 0
    eval_every: int = 0
    save_every: int = 0
    log_every: int = 1
    gradient_checkpointing: bool = True
    precond_lambda: float = 1e-6
    group_by_length: bool = False
    num_workers: int | None = None  # DataLoader workers; None: 2 on CUDA, 0 (main process) elsewhere
    save_total_limit: int | None = None  # keep only the newest N checkpoints; None: all
    padding_free: bool = True  # micro-batches flattened into one row (position_ids restart per sequence) where the model supports it
    packing: bool = False  # whole sequences packed into rows of max_length tokens (best-fit decreasing); batch_size counts rows
    max_length: int = 512  # packing: tokens per row
    compile: bool = False  # torch.compile each decoder block (qlora_ga.compile)
    fused_lora: bool = False  # each 4-bit LoRA linear as one autograd Function (qlora_ga.fused)


def total_steps(n_train: int, s: TrainSettings, world: int = 1, train: list[dict] | None = None) -> int:
    """Optimizer steps of the run; each takes ``batch_size * grad_accum * world`` sequences (``world`` processes),
    or as many packed rows with ``s.packing`` (then ``train``, the examples, gives the first epoch's row count)."""
    if s.max_steps >= 0:
        return s.max_steps
    if s.packing:
        if train is None:
            raise ValueError("total_steps() with packing needs the training examples")
        n_train = len(StepBatches(train, s, world=world).packed_rows(0))
    per_epoch = math.ceil(n_train / (s.batch_size * s.grad_accum * world))
    return max(1, math.ceil(s.epochs * per_epoch))


def warmup_steps(total: int, warmup: float) -> int:
    return int(round(warmup * total)) if warmup < 1 else int(warmup)


# ------------------------------------------------------------------ optimizer


def trainable_parameters(model) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def build_optimizer(model, s: TrainSettings, device: torch.device):
    params = trainable_parameters(model)
    kw = dict(lr=s.lr, weight_decay=s.weight_decay)
    if s.optim in ("adamw", "lora-one-precond"):
        return torch.optim.AdamW(params, **kw)
    if s.optim == "prodigy":
        return build_prodigy(params, s)
    if s.optim not in ("paged_adamw_32bit", "paged_adamw_8bit"):
        raise QloraGaError(f"unknown --optim '{s.optim}': use paged_adamw_32bit, paged_adamw_8bit, adamw, lora-one-precond or prodigy")
    if device.type != "cuda":
        # paged (unified-memory) optimizers exist only on CUDA; identical update rule without paging
        warnings.warn(f"--optim {s.optim} needs CUDA: using torch AdamW on {device.type}", stacklevel=2)
        return torch.optim.AdamW(params, **kw)
    import bitsandbytes as bnb

    cls = bnb.optim.PagedAdamW32bit if s.optim == "paged_adamw_32bit" else bnb.optim.PagedAdamW8bit
    return cls(params, **kw)


def build_prodigy(params, s: TrainSettings):
    """Prodigy (Mishchenko & Defazio 2024, the ``prodigyopt`` package): Adam whose step size ``d`` is
    estimated on the fly, so the lr is a multiplier (1.0) of it. Bias correction and the warmup
    safeguard are on, as its authors advise with a warmup schedule. ``d`` lives in the param group,
    so it is saved and restored with the optimizer state (exact resume); the trainer logs it."""
    try:
        from prodigyopt import Prodigy
    except ImportError:
        raise QloraGaError("--optim prodigy needs the prodigyopt package: pip install prodigyopt (or the [prodigy] extra)") from None
    return Prodigy(params, lr=s.lr, weight_decay=s.weight_decay, use_bias_correction=True, safeguard_warmup=True)


def precondition_lora_grads(model, lam: float = 1e-6):
    """LoRA-One's preconditioner (docs/DESIGN.md section 5): g_A <- (B^T B + lam I)^-1 g_A, g_B <- g_B (A A^T + lam I)^-1."""
    from .init import lora_layers

    for layer in lora_layers(model).values():
        for name in layer.active_adapters:
            A, B = layer.lora_A[name].weight, layer.lora_B[name].weight
            r = A.shape[0]
            eye = torch.eye(r, device=A.device, dtype=torch.float32)
            # solve_ex: no per-layer device sync for an error check (the matrices are positive definite for lam > 0)
            if A.grad is not None:
                A.grad.copy_(torch.linalg.solve_ex(B.float().T @ B.float() + lam * eye, A.grad.float())[0].to(A.grad.dtype))
            if B.grad is not None:
                B.grad.copy_(torch.linalg.solve_ex(A.float() @ A.float().T + lam * eye, B.grad.float().T)[0].T.to(B.grad.dtype))


# ------------------------------------------------------------------ data order

#: --group-by-length sorts the sequences of each chunk of this many micro-batches by length
#: (transformers' LengthGroupedSampler uses the same 50)
LENGTH_GROUP_MICRO_BATCHES = 50


def epoch_order(n: int, seed: int, epoch: int, lengths: list[int] | None = None, group: int = 0) -> list[int]:
    """The example order of ``epoch``: a seeded permutation; with ``lengths``, each run of ``group``
    consecutive examples of it sorted by length, longest first (so a micro-batch holds similar lengths)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(n, generator=g).tolist()
    if lengths is None:
        return order
    return [i for j in range(0, n, group) for i in sorted(order[j : j + group], key=lambda i: -lengths[i])]


class StepBatches(torch.utils.data.Dataset):
    """Item ``step``: this process's collated micro-batches of optimizer step ``step`` and the token counts.

    A pure function of (data, seed, step), so a resumed run needs no data cursor; each epoch's order
    is computed once (the last two are kept: a step may straddle an epoch boundary). Indexed by a
    ``DataLoader``, whose workers collate the next steps while the current one trains. With ``world``
    processes a step takes ``grad_accum * world`` micro-batches; process ``rank`` trains on every
    ``world``-th of them, and the step's label-token count (the loss's weight) is the whole step's.

    ``flat``: each micro-batch is flattened into one row without padding (``data.packing``; only for a
    model that supports it, see ``padding_free_support``). With ``s.packing`` a micro-batch is
    ``batch_size`` rows of whole sequences, at most ``max_length`` tokens each: each epoch's seeded order
    is packed (``data.packing.pack_order``) and step ``t`` takes rows ``t * batch_size * grad_accum * world``
    onwards, counted over the epochs, so the order stays a pure function of (data, seed, step).
    """

    def __init__(self, train: list[dict], s: TrainSettings, pad_token_id: int | None = None, rank: int = 0, world: int = 1,
                 flat: bool = False):
        self.train, self.s, self.pad, self.rank, self.world, self.flat = train, s, pad_token_id, rank, world, flat
        self.lengths = [len(ex["input_ids"]) for ex in train] if s.group_by_length or s.packing else None
        self._orders: dict[int, list[int]] = {}
        self._rows: dict[int, list[list[int]]] = {}  # packing: each epoch's rows (example indices)
        self._row_counts: list[int] = []  # packing: rows of epochs 0, 1, ...

    def order(self, epoch: int) -> list[int]:
        if epoch not in self._orders:
            self._orders = {e: o for e, o in self._orders.items() if e >= epoch - 1}
            self._orders[epoch] = epoch_order(len(self.train), self.s.seed, epoch,
                                              self.lengths if self.s.group_by_length else None,
                                              LENGTH_GROUP_MICRO_BATCHES * self.s.batch_size)
        return self._orders[epoch]

    def packed_rows(self, epoch: int) -> list[list[int]]:
        """Packing: the rows of ``epoch`` (example indices; best-fit decreasing over windows of its order)."""
        from .data.packing import pack_order

        if epoch not in self._rows:
            self._rows = {e: r for e, r in self._rows.items() if e >= epoch - 1}
            self._rows[epoch] = pack_order(self.order(epoch), self.lengths, self.s.max_length, self.s.seed * 1_000_003 + epoch)
        return self._rows[epoch]

    def _row(self, k: int) -> list[dict]:
        """Packing: global row ``k``, counted over the epochs."""
        epoch = 0
        while True:
            if epoch == len(self._row_counts):
                self._row_counts.append(len(self.packed_rows(epoch)))
            if k < self._row_counts[epoch]:
                return [self.train[i] for i in self.packed_rows(epoch)[k]]
            k -= self._row_counts[epoch]
            epoch += 1

    def examples(self, step: int) -> list[list[dict]]:
        """All micro-batches of the step (every process's); with packing, each a list of rows (lists of examples)."""
        per_step = self.s.batch_size * self.s.grad_accum * self.world
        if self.s.packing:
            rows = [self._row(k) for k in range(step * per_step, (step + 1) * per_step)]
            return [rows[j : j + self.s.batch_size] for j in range(0, per_step, self.s.batch_size)]
        out = []
        for k in range(step * per_step, (step + 1) * per_step):
            epoch, i = divmod(k, len(self.train))
            out.append(self.train[self.order(epoch)[i]])
        return [out[j : j + self.s.batch_size] for j in range(0, per_step, self.s.batch_size)]

    def collate(self, mb: list) -> dict[str, torch.Tensor]:
        """One micro-batch: packed rows, one padding-free row, or padded (as the settings and the model allow)."""
        from .data.packing import collate_packed, collate_padding_free

        if self.s.packing:
            return collate_packed(mb, self.pad)
        return collate_padding_free(mb, self.pad) if self.flat else collate(mb, self.pad)

    def __getitem__(self, step: int) -> dict:
        examples = self.examples(step)
        every = [self.collate(mb) for mb in examples]  # (cheap, on the host) for the counts
        mbs = every[self.rank :: self.world]
        seqs = [ex for mb in examples for ex in (sum(mb, []) if self.s.packing else mb)]
        return {"micro_batches": mbs,
                "label_tokens": [count_label_tokens(b["labels"]) for b in mbs],
                "step_label_tokens": sum(count_label_tokens(b["labels"]) for b in every),  # the loss's weight
                "input_tokens": sum(_real_tokens(ex) for ex in seqs),  # useful (non-pad) tokens
                "computed_tokens": sum(b["input_ids"].numel() for b in every)}  # what the model runs, padding included


def _real_tokens(ex: dict) -> int:
    return int(sum(ex["attention_mask"])) if "attention_mask" in ex else len(ex["input_ids"])


def micro_batches_for_step(train: list[dict], step: int, s: TrainSettings) -> list[list[dict]]:
    """The micro-batches of optimizer step ``step``: a pure function of (data, seed, step) — resume needs no cursor."""
    return StepBatches(train, s).examples(step)


def step_loader(train: list[dict], s: TrainSettings, pad_token_id: int, start_step: int, steps: int, device: torch.device,
                flat: bool = False):
    """Steps ``start_step .. steps-1`` through a ``DataLoader``: on CUDA two worker processes collate
    ahead into pinned memory; on CPU the main process does it (workers would only compete for the cores).
    ``flat``: padding-free micro-batches (see :class:`StepBatches`)."""
    cuda = device.type == "cuda"
    workers = s.num_workers if s.num_workers is not None else (min(2, os.cpu_count() or 1) if cuda else 0)
    data = StepBatches(train, s, pad_token_id, distributed.rank(), distributed.world(), flat=flat)
    # its own generator: creating the iterator draws a seed, which must not move the global RNG (exact resume)
    return torch.utils.data.DataLoader(data, batch_size=None,
                                       sampler=range(start_step, steps), num_workers=workers, pin_memory=cuda,
                                       generator=torch.Generator().manual_seed(s.seed))


# ------------------------------------------------------------------ checkpoints


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


#: a checkpoint's files. Its top level is a PEFT adapter folder of the model at that step (``adapter_config.json``,
#: ``adapter_model.safetensors`` with the residual folded in, ``qlora_ga.json``: what export.py, evaluate.py and
#: vanilla PEFT load); resume reads the trainable rank-r adapter and the residual from their own files.
RESUME_ADAPTER = "resume_adapter.safetensors"
RESUME_RESIDUAL = "resume_residual.safetensors"
TRAINER_STATE = "trainer_state.json"
OPTIMIZER_STATE = "state.pt"
CHECKPOINT_FORMAT = 2  # 1: adapter_model.safetensors was the trainable adapter, residual.safetensors beside it


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

    from .export import save_adapter

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


# ------------------------------------------------------------------ loop


def _autocast(device: torch.device, dtype: torch.dtype):
    if device.type == "cuda" and dtype in (torch.bfloat16, torch.float16):
        return torch.autocast("cuda", dtype=dtype)
    return torch.autocast(device.type, enabled=False)


def _mem(device: torch.device) -> float:
    if device.type == "cuda":
        return round(torch.cuda.max_memory_allocated(device) / 2**30, 3)  # GiB
    try:
        import resource

        return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)  # GiB (ru_maxrss is KiB on Linux)
    except ImportError:  # pragma: no cover
        return float("nan")


@torch.no_grad()
def evaluate_loss(model, examples: list[dict], batch_size: int, pad_token_id: int, device, dtype, flat: bool = False) -> float:
    """Token-weighted mean loss over all label tokens of ``examples`` (split over the processes, if several).
    ``flat``: padding-free batches (only for a model that supports them, see ``padding_free_support``)."""
    from .data.packing import collate_padding_free, model_inputs

    was = model.training
    model.eval()
    total, n = torch.zeros((), dtype=torch.float64, device=device), 0
    for i in range(distributed.rank() * batch_size, len(examples), batch_size * distributed.world()):
        b = (collate_padding_free if flat else collate)(examples[i : i + batch_size], pad_token_id)
        k = count_label_tokens(b["labels"])  # on the host: no device sync per batch
        if k == 0:
            continue
        with _autocast(device, dtype):
            loss = model(**model_inputs({key: v.to(device) for key, v in b.items()})).loss
        total = total + loss.double() * k
        n += k
    model.train(was)
    total, n = distributed.sum_tensor(torch.stack([total, torch.tensor(float(n), dtype=torch.float64, device=device)])).tolist()
    return total / max(n, 1)


def _data_parallel(model, device: torch.device):
    """The model in ``DistributedDataParallel`` over its trainable parameters (the adapters) only."""
    from torch.nn.parallel import DistributedDataParallel

    frozen = [n for n, p in model.named_parameters() if not p.requires_grad] + [n for n, _ in model.named_buffers()]
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, frozen)  # no 4-bit weights on the wire
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                   broadcast_buffers=False)


def _no_sync(step_model, skip: bool):
    """``DistributedDataParallel.no_sync()`` where ``skip`` (a non-final micro-batch), else nothing."""
    import contextlib

    return step_model.no_sync() if skip and hasattr(step_model, "no_sync") else contextlib.nullcontext()


def _checkpointing(model, on: bool):
    """Gradient (activation) checkpointing through transformers' own switch (renamed in v5)."""
    name = "activation_checkpointing" if hasattr(model, "activation_checkpointing_enable") else "gradient_checkpointing"
    if on:
        getattr(model, f"{name}_enable")(**{f"{name}_kwargs": {"use_reentrant": False}})
    else:
        getattr(model, f"{name}_disable")()


def _follow_settings(optimizer, scheduler, s: TrainSettings) -> None:
    """After loading a checkpoint's optimizer and scheduler: the peak lr and weight decay of ``s``, and the lr of
    the current step on the schedule built for ``s`` (its warmup and length). Unchanged settings give the saved
    values back bit for bit (the same formula the scheduler's own step uses)."""
    scheduler.base_lrs = [s.lr] * len(optimizer.param_groups)
    for group, fn in zip(optimizer.param_groups, scheduler.lr_lambdas):
        group["initial_lr"] = s.lr
        group["lr"] = s.lr * fn(scheduler.last_epoch)
        group["weight_decay"] = s.weight_decay
    scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]


class NonFiniteLoss(QloraGaError):
    pass


def _say_line(line: str, say, main_process: bool):
    """One line through ``say``, else above the main process's progress bar."""
    if say is not None:
        say(line)
    elif main_process:
        tqdm.write(line)


def padding_free_decision(model, s: TrainSettings, say=None) -> bool:
    """Whether training flattens its micro-batches: ``s.padding_free`` or ``s.packing`` and the model supports it
    (one line to ``say``). Packing on a model without that support is refused (its rows would attend across sequences)."""
    from .data.packing import padding_free_support

    if not (s.padding_free or s.packing):
        return False
    ok, how = padding_free_support(model)
    if s.packing and not ok:
        raise QloraGaError(f"--packing needs attention that stays within each sequence, and here it does not: {how}; "
                           "run without --packing")
    if say is not None:
        what = "packing" if s.packing else "padding-free micro-batches"
        say(f"{what}: on ({how})" if ok else f"padding-free micro-batches: off, padded instead ({how})")
    return ok


def train(model, tokenizer, train_data: list[dict], eval_data: list[dict], s: TrainSettings, out_dir: Path,
          *, start_step: int = 0, checkpoint: Path | None = None, compute_dtype: torch.dtype = torch.float32,
          stop_after: int | None = None, progress: bool = True, reporter=None, record: dict | None = None,
          on_saved=None, say=None, flat: bool | None = None) -> dict:
    """Train the adapter for ``total_steps`` optimizer steps; return a summary dict.

    ``checkpoint``: resume its optimizer/scheduler/RNG state (weights must already be loaded).
    ``stop_after``: raise KeyboardInterrupt after that step's checkpoint (tests the Ctrl-C path).
    ``reporter``: also gets every metrics row (``metrics.make_reporter``, ``--report-to``); the caller closes it.
    ``record``: written into every checkpoint's ``trainer_state.json`` (the run's settings, checked on resume).
    ``on_saved``: called with each checkpoint's folder once it is complete (main process).
    ``say``: gets the padding-free decision (one line), if given.
    ``flat``: that decision, when the caller made it already (:func:`padding_free_decision`; no second probe).

    ``s.padding_free`` flattens each micro-batch into one row where :func:`~qlora_ga.data.padding_free_support`
    finds the model supports it (same sequences, same token-weighted loss; padded otherwise); ``s.packing``
    needs that support and is refused without it.

    A resumed run continues the checkpoint's optimizer and schedule; a new peak lr, warmup, weight decay or
    run length applies from the resumed step on (the schedule is rebuilt for them, not the one saved).
    """
    from transformers import get_cosine_schedule_with_warmup

    out_dir = Path(out_dir)
    device = next(p for p in model.parameters() if p.requires_grad).device
    if not train_data:
        raise QloraGaError("no training examples: check the dataset")
    world = distributed.world()
    flat = padding_free_decision(model, s, say) if flat is None else flat
    steps = total_steps(len(train_data), s, world, train_data)
    pad = tokenizer.pad_token_id
    optimizer = build_optimizer(model, s, device)
    scheduler = get_cosine_schedule_with_warmup(optimizer, warmup_steps(steps, s.warmup), steps)
    scaler = torch.amp.GradScaler(device.type, enabled=compute_dtype == torch.float16)  # fp16: loss scaling
    if s.gradient_checkpointing:
        _checkpointing(model, True)
    if checkpoint is not None:
        # on the CPU first (a GPU checkpoint resumes anywhere); the optimizer moves its state to the parameters
        try:
            st = torch.load(checkpoint / OPTIMIZER_STATE, weights_only=False, map_location="cpu")
        except Exception as e:  # noqa: BLE001 - (find_checkpoint verified it; a file changed since)
            raise QloraGaError(f"{checkpoint / OPTIMIZER_STATE} is unreadable ({type(e).__name__}): resume from an earlier checkpoint") from None
        optimizer.load_state_dict(st["optimizer"])
        scheduler.load_state_dict(st["scheduler"])
        _follow_settings(optimizer, scheduler, s)
        rng = st["rng"] if isinstance(st["rng"], list) else [st["rng"]]  # one state per process that wrote it
        if len(rng) != world:
            raise QloraGaError(
                f"checkpoint {checkpoint} was written by {len(rng)} process(es), this run has {world}: the data order and "
                f"batch depend on it; resume with {len(rng)} process(es)"
            )
        _set_rng_state(rng[distributed.rank()])
        if scaler.is_enabled() and "scaler" in st:
            scaler.load_state_dict(st["scaler"])
    main_process = distributed.is_main()  # writes the metrics and shows the progress
    metrics = MetricsLogger(out_dir / "metrics.jsonl", resume_step=start_step if checkpoint is not None else None,
                            overwrite=checkpoint is None, reporter=reporter) if main_process else None
    params = trainable_parameters(model)
    step_model = _data_parallel(model, device) if world > 1 else model
    model.train()
    last_ckpt = checkpoint
    if start_step >= steps and main_process:
        print(f"the run is at step {start_step}, the end of its {steps} steps: nothing to train (raise --max-steps "
              "or --epochs to train on)", flush=True)
    bar = tqdm(total=steps, initial=start_step, desc="training", disable=not (progress and main_process), dynamic_ncols=True)
    summary = {"steps": steps, "start_step": start_step, "padding_free": flat, "packing": s.packing}
    if eval_data and checkpoint is None:  # where the held-out loss starts (the init's own value)
        summary["eval_loss_start"] = round(evaluate_loss(model, eval_data, s.batch_size, pad, device, compute_dtype, flat), 6)
        if metrics:
            metrics.log(step=0, eval_loss=summary["eval_loss_start"])
        model.train()
    loader = iter(step_loader(train_data, s, pad, start_step, steps, device, flat))
    stack = contextlib.ExitStack()  # --fused-lora, --compile: for the loop only, PEFT's eager forward again after it
    compile_report = None
    try:
        stack.enter_context(fused(model, s.fused_lora))  # (before compiling: the compiled blocks trace it)
        if s.fused_lora:
            _say_line(describe_fused(model, device, _autocast(device, compute_dtype)), say, main_process)
        compile_report = stack.enter_context(compiled(model, s.compile))
        for step in range(start_step, steps):
            t0 = time.perf_counter()
            item = next(loader)
            n_tok = item["step_label_tokens"]  # every process's, counted on the host when collated: no device sync
            # the step's loss stays on the device (fp64, summed like Python floats) until its one sync below
            loss_sum = torch.zeros((), dtype=torch.float64, device=device)
            n_mb = len(item["micro_batches"])
            for i, (b, k) in enumerate(zip(item["micro_batches"], item["label_tokens"])):
                if k == 0 and world == 1:
                    continue
                b = {key: v.to(device, non_blocking=True) for key, v in b.items()}
                # several processes: their gradients are averaged once, on the last micro-batch
                with _no_sync(step_model, i < n_mb - 1), _autocast(device, compute_dtype):
                    if k:
                        loss = step_model(**model_inputs(b)).loss * (k / n_tok)  # token-weighted over the whole optimizer step
                    else:  # no label token: a zero loss keeps this process in the processes' gradient average
                        inputs = model_inputs({key: v for key, v in b.items() if key != "labels"})
                        loss = step_model(**inputs).logits.float().sum() * 0.0
                    # x world: the average over processes of gradients whose weights already sum over all of them
                    scaler.scale(loss * world).backward()
                loss_sum = loss_sum + loss.detach().double()
            loss_sum = distributed.sum_tensor(loss_sum)
            scaler.unscale_(optimizer)
            if s.optim == "lora-one-precond":
                precondition_lora_grads(model, s.precond_lambda)
            grad_norm = torch.nn.utils.clip_grad_norm_(params, s.max_grad_norm if s.max_grad_norm > 0 else float("inf"))
            loss_val, grad_norm = torch.stack([loss_sum, grad_norm.double()]).tolist()  # the step's one host sync
            if not math.isfinite(loss_val):
                where = f"; the last good checkpoint is {last_ckpt}" if last_ckpt else ""
                raise NonFiniteLoss(f"the loss became {loss_val} at step {step + 1}{where}: lower --lr, or check the data")
            if not math.isfinite(grad_norm) and not scaler.is_enabled():  # (fp16's scaler skips such steps itself)
                where = f"; the last good checkpoint is {last_ckpt}" if last_ckpt else ""
                raise NonFiniteLoss(f"the gradient became {grad_norm} at step {step + 1}{where}: lower --lr, or check the data")
            lr = scheduler.get_last_lr()[0]
            try:
                scaler.step(optimizer)
            except RuntimeError as e:  # e.g. an lr so large that Adam's step size overflows fp32
                if "overflow" not in str(e):
                    raise
                where = f"; the last good checkpoint is {last_ckpt}" if last_ckpt else ""
                raise NonFiniteLoss(f"the update overflowed at step {step + 1} (lr {lr:g}){where}: lower --lr") from None
            scaler.update()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            done = step + 1
            dt = time.perf_counter() - t0
            row = {"step": done, "loss": round(loss_val, 6), "lr": lr, "grad_norm": round(grad_norm, 6),
                   "tokens_per_s": round(item["input_tokens"] / dt, 1), "mem": _mem(device)}
            if "d" in optimizer.param_groups[0]:  # prodigy: its step-size estimate (effective lr = d * lr)
                row["d"] = float(optimizer.param_groups[0]["d"])
            if eval_data and ((s.eval_every and done % s.eval_every == 0) or done == steps):
                row["eval_loss"] = round(evaluate_loss(model, eval_data, s.batch_size, pad, device, compute_dtype, flat), 6)
            if metrics and (done % s.log_every == 0 or done == steps or "eval_loss" in row):
                metrics.log(**row)
            bar.set_postfix(loss=f"{loss_val:.4f}", lr=f"{lr:.2e}", tok_s=f"{row['tokens_per_s']:.0f}")
            bar.update(1)
            if (s.save_every and done % s.save_every == 0) or done == steps or (stop_after is not None and done == stop_after):
                last_ckpt = save_checkpoint(model, optimizer, scheduler, done, out_dir,
                                            {"total_steps": steps, "lr": s.lr, "warmup": s.warmup,
                                             "weight_decay": s.weight_decay, **(record or {})},
                                            scaler, keep=s.save_total_limit)
                if on_saved is not None and main_process:
                    on_saved(last_ckpt)
            if stop_after is not None and done == stop_after and done < steps:
                raise KeyboardInterrupt
            summary.update(final_loss=loss_val, **({"eval_loss": row["eval_loss"]} if "eval_loss" in row else {}))
            if compile_report is not None and step == start_step:
                _say_line(compile_stats(compile_report).line(), say, main_process)  # after the first compiled step
    finally:
        stack.close()
        if compile_report is not None:
            summary["compile"] = compile_stats(compile_report).as_dict()
        loader = None  # stops the DataLoader's workers
        bar.close()
        if metrics:
            metrics.close()
        if s.gradient_checkpointing:
            _checkpointing(model, False)
        model.eval()
    summary["last_checkpoint"] = str(last_ckpt) if last_ckpt else None
    return summary
