"""Step 4 of the pipeline: adapter training (DESIGN section 5), in one readable loop.

bitsandbytes paged AdamW (32-bit default, 8-bit option; torch AdamW on CPU), LoRA-One's
preconditioned AdamW as an option, gradient checkpointing, bf16/fp16 autocast on GPU, gradient
accumulation with a token-weighted loss, warmup + cosine (transformers), grad-norm clipping, eval
loss every N steps, metrics JSONL, and atomic checkpoints that resume exactly (adapter, residual,
optimizer, scheduler, RNG; the data position follows from the step).
"""

from __future__ import annotations

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

from .data import collate
from .errors import QloraGaError
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


def total_steps(n_train: int, s: TrainSettings) -> int:
    if s.max_steps >= 0:
        return s.max_steps
    per_epoch = math.ceil(n_train / (s.batch_size * s.grad_accum))
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
    if s.optim not in ("paged_adamw_32bit", "paged_adamw_8bit"):
        raise QloraGaError(f"unknown --optim '{s.optim}': use paged_adamw_32bit, paged_adamw_8bit, adamw or lora-one-precond")
    if device.type != "cuda":
        # paged (unified-memory) optimizers exist only on CUDA; identical update rule without paging
        warnings.warn(f"--optim {s.optim} needs CUDA: using torch AdamW on {device.type}", stacklevel=2)
        return torch.optim.AdamW(params, **kw)
    import bitsandbytes as bnb

    cls = bnb.optim.PagedAdamW32bit if s.optim == "paged_adamw_32bit" else bnb.optim.PagedAdamW8bit
    return cls(params, **kw)


def precondition_lora_grads(model, lam: float = 1e-6):
    """LoRA-One's preconditioner (DESIGN §3): g_A <- (B^T B + lam I)^-1 g_A, g_B <- g_B (A A^T + lam I)^-1."""
    from .init import lora_layers

    for layer in lora_layers(model).values():
        for name in layer.active_adapters:
            A, B = layer.lora_A[name].weight, layer.lora_B[name].weight
            r = A.shape[0]
            eye = torch.eye(r, device=A.device, dtype=torch.float32)
            if A.grad is not None:
                A.grad.copy_(torch.linalg.solve(B.float().T @ B.float() + lam * eye, A.grad.float()).to(A.grad.dtype))
            if B.grad is not None:
                B.grad.copy_(torch.linalg.solve(A.float() @ A.float().T + lam * eye, B.grad.float().T).T.to(B.grad.dtype))


# ------------------------------------------------------------------ data order


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g).tolist()


def micro_batches_for_step(train: list[dict], step: int, s: TrainSettings) -> list[list[dict]]:
    """The micro-batches of optimizer step ``step``: a pure function of (data, seed, step) — resume needs no cursor."""
    per_step = s.batch_size * s.grad_accum
    out, cache = [], {}
    for k in range(step * per_step, (step + 1) * per_step):
        epoch, i = divmod(k, len(train))
        if epoch not in cache:
            cache[epoch] = epoch_order(len(train), s.seed, epoch)
        out.append(train[cache[epoch][i]])
    return [out[j : j + s.batch_size] for j in range(0, per_step, s.batch_size)]


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


def save_checkpoint(model, optimizer, scheduler, step: int, out_dir: Path, extra: dict | None = None) -> Path:
    """Write ``checkpoints/step-N`` atomically (temp dir + rename): trainable weights, residual, optimizer, scheduler, RNG."""
    from peft import get_peft_model_state_dict

    root = Path(out_dir) / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step}"
    tmp = root / f".tmp-step-{step}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file({k: v.detach().contiguous() for k, v in get_peft_model_state_dict(model).items()}, tmp / "adapter_model.safetensors")
    res = residual_state_dict(model)
    if res:
        save_file(res, tmp / "residual.safetensors")
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": _rng_state()}, tmp / "state.pt")
    (tmp / "trainer_state.json").write_text(json.dumps({"step": step, **(extra or {})}, indent=1))
    if final.exists():  # same step saved again (e.g. a resumed run): replace it only now that the new one is complete
        old = root / f".old-step-{step}-{os.getpid()}"
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old)
    else:
        tmp.rename(final)
    return final


def find_checkpoint(out_dir: Path, resume: str) -> Path:
    if resume and resume != "latest":
        p = Path(resume)
        if not (p / "trainer_state.json").is_file():
            raise QloraGaError(f"'{resume}' is not a checkpoint folder (no trainer_state.json): pass checkpoints/step-N of a run, or --resume alone")
        return p
    root = Path(out_dir) / CHECKPOINTS
    steps = sorted((int(p.name.split("-")[1]), p) for p in root.glob("step-*") if (p / "trainer_state.json").is_file()) if root.is_dir() else []
    if not steps:
        raise QloraGaError(f"no checkpoint to resume in {root}: run without --resume, or point --resume at a checkpoint")
    return steps[-1][1]


def load_checkpoint_weights(model, ckpt: Path):
    """Trainable LoRA weights and residual of a checkpoint into a freshly wrapped PEFT model."""
    from peft import set_peft_model_state_dict

    set_peft_model_state_dict(model, load_file(ckpt / "adapter_model.safetensors"))
    if (ckpt / "residual.safetensors").is_file():
        load_residual_state_dict(model, load_file(ckpt / "residual.safetensors"))


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
def evaluate_loss(model, examples: list[dict], batch_size: int, pad_token_id: int, device, dtype) -> float:
    """Token-weighted mean loss over all label tokens of ``examples``."""
    was = model.training
    model.eval()
    total, n = 0.0, 0
    for i in range(0, len(examples), batch_size):
        b = {k: v.to(device) for k, v in collate(examples[i : i + batch_size], pad_token_id).items()}
        k = int((b["labels"][:, 1:] != -100).sum())
        if k == 0:
            continue
        with _autocast(device, dtype):
            loss = model(**b).loss
        total += float(loss) * k
        n += k
    model.train(was)
    return total / max(n, 1)


def _checkpointing(model, on: bool):
    """Gradient (activation) checkpointing through transformers' own switch (renamed in v5)."""
    name = "activation_checkpointing" if hasattr(model, "activation_checkpointing_enable") else "gradient_checkpointing"
    if on:
        getattr(model, f"{name}_enable")(**{f"{name}_kwargs": {"use_reentrant": False}})
    else:
        getattr(model, f"{name}_disable")()


class NonFiniteLoss(QloraGaError):
    pass


def train(model, tokenizer, train_data: list[dict], eval_data: list[dict], s: TrainSettings, out_dir: Path,
          *, start_step: int = 0, checkpoint: Path | None = None, compute_dtype: torch.dtype = torch.float32,
          stop_after: int | None = None, progress: bool = True, reporter=None) -> dict:
    """Train the adapter for ``total_steps`` optimizer steps; return a summary dict.

    ``checkpoint``: resume its optimizer/scheduler/RNG state (weights must already be loaded).
    ``stop_after``: raise KeyboardInterrupt after that step's checkpoint (tests the Ctrl-C path).
    ``reporter``: also gets every metrics row (``metrics.make_reporter``, ``--report-to``); the caller closes it.
    """
    from transformers import get_cosine_schedule_with_warmup

    out_dir = Path(out_dir)
    device = next(p for p in model.parameters() if p.requires_grad).device
    if not train_data:
        raise QloraGaError("no training examples: check the dataset")
    steps = total_steps(len(train_data), s)
    pad = tokenizer.pad_token_id
    optimizer = build_optimizer(model, s, device)
    scheduler = get_cosine_schedule_with_warmup(optimizer, warmup_steps(steps, s.warmup), steps)
    scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda" and compute_dtype == torch.float16)
    if s.gradient_checkpointing:
        _checkpointing(model, True)
    if checkpoint is not None:
        st = torch.load(checkpoint / "state.pt", weights_only=False)
        optimizer.load_state_dict(st["optimizer"])
        scheduler.load_state_dict(st["scheduler"])
        _set_rng_state(st["rng"])
    metrics = MetricsLogger(out_dir / "metrics.jsonl", resume_step=start_step if checkpoint is not None else None,
                            overwrite=checkpoint is None, reporter=reporter)
    params = trainable_parameters(model)
    model.train()
    last_ckpt = checkpoint
    bar = tqdm(total=steps, initial=start_step, desc="training", disable=not progress, dynamic_ncols=True)
    summary = {"steps": steps, "start_step": start_step}
    if eval_data and checkpoint is None:  # where the held-out loss starts (the init's own value)
        summary["eval_loss_start"] = round(evaluate_loss(model, eval_data, s.batch_size, pad, device, compute_dtype), 6)
        metrics.log(step=0, eval_loss=summary["eval_loss_start"])
        model.train()
    try:
        for step in range(start_step, steps):
            t0 = time.perf_counter()
            mbs = [collate(mb, pad) for mb in micro_batches_for_step(train_data, step, s)]
            n_tok = sum(int((b["labels"][:, 1:] != -100).sum()) for b in mbs)
            n_in = sum(int(b["attention_mask"].sum()) for b in mbs)
            loss_sum = 0.0
            for b in mbs:
                b = {k: v.to(device) for k, v in b.items()}
                k = int((b["labels"][:, 1:] != -100).sum())
                if k == 0:
                    continue
                with _autocast(device, compute_dtype):
                    loss = model(**b).loss * (k / n_tok)  # token-weighted over the whole optimizer step
                scaler.scale(loss).backward()
                loss_sum += float(loss.detach())
            if not math.isfinite(loss_sum):
                where = f"; the last good checkpoint is {last_ckpt}" if last_ckpt else ""
                raise NonFiniteLoss(f"the loss became {loss_sum} at step {step + 1}{where}: lower --lr, or check the data")
            scaler.unscale_(optimizer)
            if s.optim == "lora-one-precond":
                precondition_lora_grads(model, s.precond_lambda)
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, s.max_grad_norm if s.max_grad_norm > 0 else float("inf")))
            if not math.isfinite(grad_norm) and not scaler.is_enabled():  # (fp16's scaler skips such steps itself)
                where = f"; the last good checkpoint is {last_ckpt}" if last_ckpt else ""
                raise NonFiniteLoss(f"the gradient became {grad_norm} at step {step + 1}{where}: lower --lr, or check the data")
            lr = scheduler.get_last_lr()[0]
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            done = step + 1
            dt = time.perf_counter() - t0
            row = {"step": done, "loss": round(loss_sum, 6), "lr": lr, "grad_norm": round(grad_norm, 6),
                   "tokens_per_s": round(n_in / dt, 1), "mem": _mem(device)}
            if eval_data and ((s.eval_every and done % s.eval_every == 0) or done == steps):
                row["eval_loss"] = round(evaluate_loss(model, eval_data, s.batch_size, pad, device, compute_dtype), 6)
            if done % s.log_every == 0 or done == steps or "eval_loss" in row:
                metrics.log(**row)
            bar.set_postfix(loss=f"{loss_sum:.4f}", lr=f"{lr:.2e}", tok_s=f"{row['tokens_per_s']:.0f}")
            bar.update(1)
            if (s.save_every and done % s.save_every == 0) or done == steps or (stop_after is not None and done == stop_after):
                last_ckpt = save_checkpoint(model, optimizer, scheduler, done, out_dir, {"total_steps": steps})
            if stop_after is not None and done == stop_after and done < steps:
                raise KeyboardInterrupt
            summary.update(final_loss=loss_sum, **({"eval_loss": row["eval_loss"]} if "eval_loss" in row else {}))
    finally:
        bar.close()
        metrics.close()
        if s.gradient_checkpointing:
            _checkpointing(model, False)
        model.eval()
    summary["last_checkpoint"] = str(last_ckpt) if last_ckpt else None
    return summary
