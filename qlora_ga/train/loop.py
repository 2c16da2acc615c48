"""The training loop (docs/DESIGN.md section 5): token-weighted gradient accumulation over the step's micro-batches,
bf16/fp16 autocast on a GPU (fp16 with loss scaling), grad-norm clipping, warmup + cosine, held-out loss every N
steps, metrics, and a checkpoint every ``save_every`` steps and at the end."""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .. import distributed
from ..compile import compile_stats, compiled
from ..data.batch import count_label_tokens
from ..data.packing import model_inputs
from ..errors import QloraGaError
from ..evaluate import evaluate_loss
from ..fused import describe as describe_fused, fused
from ..metrics import MetricsLogger
from ..model import autocast
from .checkpoint import load_training_state, save_checkpoint
from .optim import build_optimizer, precondition_lora_grads, trainable_parameters
from .order import step_loader, total_steps, warmup_steps
from .runtime import checkpointing, data_parallel, no_sync, peak_memory_gib
from ..config import TrainSettings


class NonFiniteLoss(QloraGaError):
    pass


def say_line(line: str, say, main_process: bool):
    """One line through ``say``, else above the main process's progress bar."""
    if say is not None:
        say(line)
    elif main_process:
        tqdm.write(line)


def padding_free_decision(model, s: TrainSettings, say=None) -> bool:
    """Whether training flattens its micro-batches: ``s.padding_free`` or ``s.packing`` and the model supports it
    (one line to ``say``). Packing on a model without that support is refused (its rows would attend across sequences)."""
    from ..data.packing import padding_free_support

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


@dataclass
class _Run:
    """What every step of one :func:`train` call works with."""

    model: torch.nn.Module
    step_model: torch.nn.Module  # the model, or its DistributedDataParallel wrapper
    s: TrainSettings
    device: torch.device
    compute_dtype: torch.dtype
    optimizer: torch.optim.Optimizer
    scheduler: object
    scaler: torch.amp.GradScaler
    steps: int
    world: int
    pad: int
    flat: bool
    eval_data: list[dict]
    out_dir: Path
    metrics: MetricsLogger | None
    bar: tqdm
    record: dict | None
    last_ckpt: Path | None
    params: list = field(default_factory=list)

    def evaluate(self) -> float:
        return round(evaluate_loss(self.model, self.eval_data, self.s.batch_size, self.pad, self.device,
                                   self.compute_dtype, self.flat), 6)

    def stopped(self, what: str) -> NonFiniteLoss:
        where = f"; the last good checkpoint is {self.last_ckpt}" if self.last_ckpt else ""
        return NonFiniteLoss(what.format(where=where))


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
    if not train_data:
        raise QloraGaError("no training examples: check the dataset")
    run = _start(model, tokenizer, train_data, eval_data, s, Path(out_dir), start_step, checkpoint, compute_dtype,
                 progress, reporter, record, say, flat)
    main_process = distributed.is_main()
    summary = {"steps": run.steps, "start_step": start_step, "padding_free": run.flat, "packing": s.packing}
    if eval_data and checkpoint is None:  # where the held-out loss starts (the init's own value)
        summary["eval_loss_start"] = run.evaluate()
        if run.metrics:
            run.metrics.log(step=0, eval_loss=summary["eval_loss_start"])
        model.train()
    loader = iter(step_loader(train_data, s, run.pad, start_step, run.steps, run.device, run.flat))
    stack = contextlib.ExitStack()  # --fused-lora, --compile: for the loop only, PEFT's eager forward again after it
    compile_report = None
    try:
        stack.enter_context(fused(model, s.fused_lora))  # (before compiling: the compiled blocks trace it)
        if s.fused_lora:
            say_line(describe_fused(model, run.device, autocast(run.device, compute_dtype)), say, main_process)
        compile_report = stack.enter_context(compiled(model, s.compile))
        for step in range(start_step, run.steps):
            row, loss = _step(run, next(loader), step)
            _after_step(run, row, loss, stop_after, on_saved, main_process)
            summary.update(final_loss=loss, **({"eval_loss": row["eval_loss"]} if "eval_loss" in row else {}))
            if compile_report is not None and step == start_step:
                say_line(compile_stats(compile_report).line(), say, main_process)  # after the first compiled step
    finally:
        stack.close()
        if compile_report is not None:
            summary["compile"] = compile_stats(compile_report).as_dict()
        loader = None  # stops the DataLoader's workers
        run.bar.close()
        if run.metrics:
            run.metrics.close()
        if s.gradient_checkpointing:
            checkpointing(model, False)
        model.eval()
    summary["last_checkpoint"] = str(run.last_ckpt) if run.last_ckpt else None
    return summary


def _start(model, tokenizer, train_data, eval_data, s: TrainSettings, out_dir: Path, start_step: int, checkpoint,
           compute_dtype, progress: bool, reporter, record, say, flat) -> _Run:
    """Before the first step: the schedule, optimizer and loss scaler (resumed from ``checkpoint``), the metrics
    file, the data-parallel wrapper and the progress bar."""
    from transformers import get_cosine_schedule_with_warmup

    device = next(p for p in model.parameters() if p.requires_grad).device
    world = distributed.world()
    flat = padding_free_decision(model, s, say) if flat is None else flat
    steps = total_steps(len(train_data), s, world, train_data)
    optimizer = build_optimizer(model, s, device)
    scheduler = get_cosine_schedule_with_warmup(optimizer, warmup_steps(steps, s.warmup), steps)
    scaler = torch.amp.GradScaler(device.type, enabled=compute_dtype == torch.float16)  # fp16: loss scaling
    if s.gradient_checkpointing:
        checkpointing(model, True)
    if checkpoint is not None:
        load_training_state(checkpoint, optimizer, scheduler, scaler, s, world)
    main_process = distributed.is_main()  # writes the metrics and shows the progress
    metrics = MetricsLogger(out_dir / "metrics.jsonl", resume_step=start_step if checkpoint is not None else None,
                            overwrite=checkpoint is None, reporter=reporter) if main_process else None
    params = trainable_parameters(model)
    step_model = data_parallel(model, device) if world > 1 else model
    model.train()
    if start_step >= steps and main_process:
        print(f"the run is at step {start_step}, the end of its {steps} steps: nothing to train (raise --max-steps "
              "or --epochs to train on)", flush=True)
    bar = tqdm(total=steps, initial=start_step, desc="training", disable=not (progress and main_process), dynamic_ncols=True)
    return _Run(model, step_model, s, device, compute_dtype, optimizer, scheduler, scaler, steps, world,
                tokenizer.pad_token_id, flat, eval_data, out_dir, metrics, bar, record, checkpoint, params)


def _step(run: _Run, item: dict, step: int) -> tuple[dict, float]:
    """One optimizer step over ``item``'s micro-batches; its metrics row and its loss."""
    t0 = time.perf_counter()
    loss_sum = accumulate_gradients(run.step_model, item, run.device, run.compute_dtype, run.scaler, run.world)
    run.scaler.unscale_(run.optimizer)
    if run.s.optim == "lora-one-precond":
        precondition_lora_grads(run.model, run.s.precond_lambda)
    clip = run.s.max_grad_norm if run.s.max_grad_norm > 0 else float("inf")
    grad_norm = torch.nn.utils.clip_grad_norm_(run.params, clip)
    loss_val, grad_norm = torch.stack([loss_sum, grad_norm.double()]).tolist()  # the step's one host sync
    if not math.isfinite(loss_val):
        raise run.stopped(f"the loss became {loss_val} at step {step + 1}{{where}}: lower --lr, or check the data")
    if not math.isfinite(grad_norm) and not run.scaler.is_enabled():  # (fp16's scaler skips such steps itself)
        raise run.stopped(f"the gradient became {grad_norm} at step {step + 1}{{where}}: lower --lr, or check the data")
    lr = run.scheduler.get_last_lr()[0]
    try:
        run.scaler.step(run.optimizer)
    except RuntimeError as e:  # e.g. an lr so large that Adam's step size overflows fp32
        if "overflow" not in str(e):
            raise
        raise run.stopped(f"the update overflowed at step {step + 1} (lr {lr:g}){{where}}: lower --lr") from None
    run.scaler.update()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    dt = time.perf_counter() - t0
    row = {"step": step + 1, "loss": round(loss_val, 6), "lr": lr, "grad_norm": round(grad_norm, 6),
           "tokens_per_s": round(item["input_tokens"] / dt, 1), "mem": peak_memory_gib(run.device)}
    if "d" in run.optimizer.param_groups[0]:  # prodigy: its step-size estimate (effective lr = d * lr)
        row["d"] = float(run.optimizer.param_groups[0]["d"])
    return row, loss_val


def accumulate_gradients(step_model, item: dict, device: torch.device, compute_dtype: torch.dtype,
                         scaler: torch.amp.GradScaler | None = None, world: int = 1) -> torch.Tensor:
    """Forward and backward of one optimizer step's micro-batches (``item``: :func:`step_item`, or one of
    :class:`~qlora_ga.train.order.StepBatches`), each weighted by its share of the step's label tokens, so the
    gradients are those of the step's token-weighted mean loss. Returns that loss, summed on the device (fp64, like
    Python floats) until the step's one sync. The benchmarks time this very function."""
    n_tok = item["step_label_tokens"]  # every process's, counted on the host when collated: no device sync
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    n_mb = len(item["micro_batches"])
    for i, (b, k) in enumerate(zip(item["micro_batches"], item["label_tokens"])):
        if k == 0 and world == 1:
            continue
        b = {key: v.to(device, non_blocking=True) for key, v in b.items()}
        # several processes: their gradients are averaged once, on the last micro-batch
        with no_sync(step_model, i < n_mb - 1), autocast(device, compute_dtype):
            if k:
                loss = step_model(**model_inputs(b)).loss * (k / n_tok)  # token-weighted over the whole optimizer step
            else:  # no label token: a zero loss keeps this process in the processes' gradient average
                inputs = model_inputs({key: v for key, v in b.items() if key != "labels"})
                loss = step_model(**inputs).logits.float().sum() * 0.0
            # x world: the average over processes of gradients whose weights already sum over all of them
            scaled = loss * world
            (scaler.scale(scaled) if scaler is not None else scaled).backward()
        loss_sum = loss_sum + loss.detach().double()
    return distributed.sum_tensor(loss_sum)


def step_item(micro_batches: list[dict]) -> dict:
    """One step's collated micro-batches (one process) in the form :func:`accumulate_gradients` takes."""
    counts = [count_label_tokens(b["labels"]) for b in micro_batches]
    return {"micro_batches": micro_batches, "label_tokens": counts, "step_label_tokens": sum(counts)}


def _after_step(run: _Run, row: dict, loss: float, stop_after: int | None, on_saved, main_process: bool) -> None:
    """The step's held-out loss (every ``eval_every`` steps and at the end), metrics row, progress and checkpoint."""
    done, s = row["step"], run.s
    if run.eval_data and ((s.eval_every and done % s.eval_every == 0) or done == run.steps):
        row["eval_loss"] = run.evaluate()
    if run.metrics and (done % s.log_every == 0 or done == run.steps or "eval_loss" in row):
        run.metrics.log(**row)
    run.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{row['lr']:.2e}", tok_s=f"{row['tokens_per_s']:.0f}")
    run.bar.update(1)
    if (s.save_every and done % s.save_every == 0) or done == run.steps or (stop_after is not None and done == stop_after):
        run.last_ckpt = save_checkpoint(run.model, run.optimizer, run.scheduler, done, run.out_dir,
                                        {"total_steps": run.steps, "lr": s.lr, "warmup": s.warmup,
                                         "weight_decay": s.weight_decay, **(run.record or {})},
                                        run.scaler, keep=s.save_total_limit)
        if on_saved is not None and main_process:
            on_saved(run.last_ckpt)
    if stop_after is not None and done == stop_after and done < run.steps:
        raise KeyboardInterrupt
