"""``scripts/finetune.py``: load -> estimate -> init -> train -> export, as one command.

Every user mistake ends with one line on stderr and exit code 2 (no traceback); nothing already
saved is removed or half-written.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

from .config import FinetuneConfig, parse_config, resolved, save_yaml, to_dict
from .constants import IGNORE_INDEX
from .errors import QloraGaError
from .fileio import atomic_write
from .log import quiet_libraries


class _Distributed:
    """``qlora_ga.distributed``, imported on first use: the arguments are checked before torch loads."""

    def __getattr__(self, name):
        from . import distributed as module

        return getattr(module, name)


distributed = _Distributed()

# The built-in demo (no --model, no --dataset, no --config): sized to finish in a few minutes on a
# 2-core CPU. Applied only to options left at their defaults; see configs/default.yaml.
DEMO_PRESET = dict(max_length=256, batch_size=4, grad_accum=2, max_steps=24, init_samples=32, eval_split="0.05",
                   output_dir="outputs/demo", no_gradient_checkpointing=True, sample_prompts=1)


def apply_demo_preset(cfg: FinetuneConfig) -> FinetuneConfig:
    if cfg.model is not None or cfg.dataset is not None or cfg.config is not None:
        return cfg
    defaults = FinetuneConfig()
    changes = {k: v for k, v in DEMO_PRESET.items() if getattr(cfg, k) == getattr(defaults, k)}
    return replace(cfg, **changes)


LAUNCHED_ERROR_GRACE_S = 3.0

LR_SEARCH = "lr_search.json"  # what --lr auto found
RESUMES = "resumes.jsonl"  # one line per --resume: from which checkpoint, and the settings it changed
RUN_MARKERS = ("run_config.yaml", "metrics.jsonl", "checkpoints", "adapter", "init_report.json")
#: everything a run writes into --output-dir (what --overwrite replaces; nothing else there is touched)
RUN_OUTPUTS = RUN_MARKERS + ("loss.png", "summary.json", "merged", "gguf", "tensorboard", "wandb", LR_SEARCH, RESUMES)
#: where --overwrite keeps the previous run until the new one has saved its first checkpoint
PREVIOUS_RUN = ".previous-run"
SET_ASIDE_DONE = ".complete"  # in PREVIOUS_RUN once every output of the old run is in it

#: the settings that decide a run's data order and adapters: a --resume must not change them
RESUME_FIXED = ("model", "dataset", "format", "prompt_column", "response_column", "messages_column", "text_column",
                "max_length", "overlong", "n_builtin", "eval_split", "batch_size", "grad_accum", "seed",
                "group_by_length", "init", "init_samples", "rank", "alpha", "gamma", "target_modules", "rank_allocation",
                "lora_dropout", "compute_dtype", "optim", "padding_free", "packing")
#: the settings a --resume may change, applied from the resumed step on (lr, warmup and length rebuild the schedule)
RESUME_APPLIED = ("lr", "warmup", "weight_decay", "max_steps", "epochs", "max_grad_norm")


def _say(msg: str):
    if distributed.is_main():
        print(msg, flush=True)


def check_output_dir(cfg: FinetuneConfig) -> Path:
    """The output folder, checked before anything loads: a folder (or creatable), writable, and not another
    run unless --resume / --overwrite. What killed writes left there is cleaned up first (main process)."""
    out = Path(cfg.output_dir)
    if out.exists() and not out.is_dir():
        raise QloraGaError(f"--output-dir '{out}' is a file: pass a folder")
    from .fileio import nearest_folder

    up = nearest_folder(out)
    if not up.is_dir():  # (mkdir would say only "Not a directory", after the gradient pass)
        raise QloraGaError(f"--output-dir '{out}' is under '{up}', which is a file: pass a folder")
    with distributed.main_first():  # (its error, if any, is every process's; the others look once it is done)
        if distributed.is_main():
            _writable(out)
            _recover(out)
    holds_run = out.is_dir() and any((out / m).exists() for m in RUN_MARKERS)
    if holds_run and not cfg.resume and not cfg.overwrite:
        raise QloraGaError(f"--output-dir '{out}' already holds a run: pass --resume to continue it, --overwrite to replace it, or another --output-dir")
    return out


def _writable(out: Path) -> None:
    """Write (and remove) a file in ``out``, or in the folder it would be created in, now: rather than find out
    after the gradient pass and training. Nothing is left behind."""
    from .fileio import nearest_folder, probe_write

    try:
        probe_write(nearest_folder(out))
    except OSError as e:
        raise QloraGaError(f"--output-dir '{out}' cannot be written ({e.strerror or e}): pass a folder you can write to") from None


def _recover(out: Path) -> None:
    """Clean up after a run that was killed: temporary files of unfinished writes, and a previous run that
    --overwrite set aside (back in place when the new run saved nothing, deleted when it did)."""
    import re

    from .fileio import clean_stale
    from .train import CHECKPOINTS

    def run_output(name):  # only what a run writes there: other files in --output-dir are not the tool's
        return name in RUN_OUTPUTS

    def checkpoint(name):
        return re.fullmatch(r"step-\d+", name) is not None

    for folder, ours in ((out, run_output), (out / CHECKPOINTS, checkpoint), (out / PREVIOUS_RUN, run_output),
                         (out / PREVIOUS_RUN / CHECKPOINTS, checkpoint)):
        for what in clean_stale(folder, ours):
            _say(f"note: {what} in {folder} (left by an interrupted write)")
    if (out / PREVIOUS_RUN).is_dir():
        if not (out / PREVIOUS_RUN / SET_ASIDE_DONE).is_file():  # killed while setting it aside: nothing new yet
            _restore_previous(out, complete=False)
            _say(f"note: put back the run in {out} that an interrupted --overwrite was setting aside")
        elif _saved_anything(out):
            shutil.rmtree(out / PREVIOUS_RUN)
            _say(f"note: removed the run that --overwrite replaced in {out} (its successor had saved a checkpoint)")
        else:
            _restore_previous(out)
            _say(f"note: put back the run in {out} that an interrupted --overwrite had set aside")


def _saved_anything(out: Path) -> bool:
    from .train import CHECKPOINTS, checkpoint_folders

    return bool(checkpoint_folders(out / CHECKPOINTS)) or (out / "adapter").is_dir()


def _set_aside_previous(out: Path) -> bool:
    """--overwrite: move the old run's outputs into ``out/.previous-run`` (same filesystem: renames), then mark
    the move complete (a start after a kill before the mark puts everything back, see :func:`_recover`)."""
    present = [m for m in RUN_OUTPUTS if (out / m).exists()]
    if not present:
        return False
    (out / PREVIOUS_RUN).mkdir()
    for m in present:
        os.replace(out / m, out / PREVIOUS_RUN / m)
    atomic_write(out / PREVIOUS_RUN / SET_ASIDE_DONE, "")
    return True


def _restore_previous(out: Path, complete: bool = True) -> None:
    """Undo :func:`_set_aside_previous`: the new run's outputs are removed and the old run's put back. When the
    set-aside did not complete, no new output exists yet: what is still in ``out`` is the old run's and stays."""
    prev = out / PREVIOUS_RUN
    for m in RUN_OUTPUTS:
        p = out / m
        if p.exists() and ((prev / m).exists() or complete):  # the old run's version wins
            shutil.rmtree(p) if p.is_dir() else p.unlink()
        if (prev / m).exists():
            os.replace(prev / m, p)
    shutil.rmtree(prev)


def check_exports(cfg: FinetuneConfig) -> None:
    """Fail before any work when --report-to's package, the GGUF converter or q4_k_m's quantizer is missing."""
    from .metrics import check_report_to

    check_report_to(cfg.report_to)
    if cfg.export_gguf:
        from .export.gguf import check_quantizer, check_type, find_converter

        check_type(cfg.export_gguf)
        check_quantizer(cfg.export_gguf)
        find_converter(cfg.llama_cpp)  # fetched into the cache now, not after hours of training
    elif cfg.llama_cpp:
        raise QloraGaError("--llama_cpp only applies with --export_gguf")


def resolve_device(cfg: FinetuneConfig):
    import torch

    if distributed.launched():  # one process per GPU (LOCAL_RANK), or gloo on the CPU
        return distributed.init(cpu=cfg.device == "cpu")
    from .model import as_device

    if cfg.device and torch.device(cfg.device).type == "cuda" and not torch.cuda.is_available():
        raise QloraGaError(f"--device {cfg.device} asks for CUDA but no CUDA GPU is available: use --device cpu or run on a GPU machine")
    return as_device(cfg.device or None)


def _sample_prompts(examples: list[dict], n: int) -> list[list[int]]:
    prompts = []
    for ex in examples[:n]:
        k = next((i for i, lab in enumerate(ex["labels"]) if lab != IGNORE_INDEX), 0)
        if k > 0:
            prompts.append(ex["input_ids"][:k])
    return prompts


def show_samples(model, tokenizer, prompts: list[list[int]], title: str, max_new_tokens: int = 64) -> list[str]:
    import torch

    device = next(model.parameters()).device
    outs = []
    for ids in prompts:
        with torch.no_grad():
            gen = model.generate(input_ids=torch.tensor([ids], device=device), attention_mask=torch.ones(1, len(ids), dtype=torch.long, device=device),
                                 max_new_tokens=max_new_tokens, do_sample=False, use_cache=True, pad_token_id=tokenizer.pad_token_id)
        text = tokenizer.decode(gen[0, len(ids):], skip_special_tokens=True).strip()
        outs.append(text)
        _say(f"--- {title}\n[prompt] {tokenizer.decode(ids, skip_special_tokens=True).strip()}\n[answer] {text}")
    return outs


def run(cfg: FinetuneConfig, argv: list[str] | None = None) -> dict:
    """The whole job for a parsed config: load -> estimate -> init -> train -> export. Returns a summary
    (also written to ``summary.json``). ``argv``: the command line it was parsed from; with ``--resume`` its
    flags then override the run's own ``run_config.yaml`` (:func:`_resume_settings`)."""
    cfg, device, out, ckpt, records = _check_run(cfg, argv)
    t_start = time.perf_counter()
    model, tok, data, targets = _load(cfg, device, records)
    flat = _padding_free(cfg, model)  # (decided once: the gradient pass and training take it)
    record = _run_record(cfg, model, data, targets)
    saved_schedule = _check_resume(cfg, ckpt, record) if ckpt is not None else {}
    lora_kw = dict(rank=cfg.rank, alpha=cfg.alpha, target_modules=targets, lora_dropout=cfg.lora_dropout,
                   use_rslora=cfg.use_rslora)
    prompts = _sample_prompts(data.eval or data.train, cfg.sample_prompts)
    before = show_samples(model, tok, prompts, "before training") if prompts and not ckpt and distributed.is_main() else []
    if ckpt is not None:
        pm, start_step, init_report = _resume_adapters(model, cfg, ckpt, out, lora_kw), _checkpoint_step(ckpt), None
    else:
        pm, init_report = _estimate_and_init(model, tok, data, cfg, targets, lora_kw, padding_free=flat)
        start_step = 0
    train_cfg, lr_search = _learning_rate(cfg, pm, tok, data, ckpt)  # --lr auto: the number
    changes = _schedule_changes(saved_schedule, train_cfg, data) if ckpt is not None else {}
    # everything is in hand: only now is an old run set aside (--overwrite), and it stays until the new one has saved
    replacing = _write_run_files(cfg, out, ckpt, init_report, lr_search, changes)
    try:
        summary = {"output_dir": str(out), "init": cfg.init}
        if cfg.max_steps != 0:
            summary.update(_train(train_cfg, pm, tok, data, out, start_step, ckpt, record,
                                  on_saved=(lambda _: _drop_previous(out)) if replacing else None, padding_free=flat))
        if not distributed.is_main():  # the processes' adapters are the same: the main one writes it
            return summary
        _export(cfg, pm, out)
    except BaseException:
        if replacing and (out / PREVIOUS_RUN).is_dir():  # the new run saved nothing: the old one comes back
            _restore_previous(out)
            _say(f"the run that --overwrite was replacing is back in {out}")
        raise
    _drop_previous(out)
    after = show_samples(pm, tok, prompts, "after training") if prompts and cfg.max_steps != 0 else []
    if "eval_loss_start" in summary and "eval_loss" in summary:
        _say(f"held-out loss: {summary['eval_loss_start']:.4f} at the start -> {summary['eval_loss']:.4f} after {summary['steps']} steps")
    summary.update(seconds=round(time.perf_counter() - t_start, 1), samples_before=before, samples_after=after)
    _write_json(out / "summary.json", summary)
    _say(f"done in {summary['seconds']} s: {out}")
    return summary


def _drop_previous(out: Path) -> None:
    if distributed.is_main() and (out / PREVIOUS_RUN).is_dir():
        shutil.rmtree(out / PREVIOUS_RUN)


def _check_run(cfg: FinetuneConfig, argv: list[str] | None = None):
    """Everything that can be checked before the model loads: device, output folder (cleaned up after a kill),
    the settings (a resume's are its run's, :func:`_resume_settings`), exports, the dataset's file, format and
    columns, the checkpoint to resume and the settings it was written with. Returns the resolved settings too."""
    from .data.build import load_checked_records
    from .methods import GRADIENT_METHODS
    from .train import find_checkpoint

    device = resolve_device(cfg)
    out = check_output_dir(cfg)
    distributed.barrier()  # every process has looked at --output-dir before the main one writes into it
    cfg = resolved(_resume_settings(cfg, argv))
    if cfg.liger:
        from .kernels import check_liger

        check_liger(device)  # before anything is loaded or written
    with distributed.main_first():  # the main process fetches the GGUF converter into the cache, if asked for
        check_exports(cfg)
    ckpt = None
    if cfg.resume:
        # a gradient init leaves a residual in every target: a checkpoint without its file is not the run
        ckpt = find_checkpoint(out, cfg.resume, expect_residual=cfg.init in GRADIENT_METHODS, say=_say)
        _check_resume(cfg, ckpt)
        if cfg.resume != "latest":  # (--resume alone takes the newest good one: what it skipped is damaged)
            _check_no_newer(out, ckpt)
    with distributed.main_first():  # the main process fills the datasets cache first
        records = load_checked_records(cfg.data_config())
    return cfg, device, out, ckpt, records


def _schedule_changes(saved: dict, cfg: FinetuneConfig, data) -> dict:
    """The lr / warmup / weight decay / run length a resume changes: applied from the resumed step on (train
    rebuilds the schedule for them), said here and recorded in resumes.jsonl. ``{key: [old, new]}``."""
    from .train import total_steps

    now = {"lr": cfg.lr, "warmup": cfg.warmup, "weight_decay": cfg.weight_decay,
           "total_steps": total_steps(len(data.train), cfg.train_settings(), distributed.world(), data.train)}
    changes = {k: [saved[k], v] for k, v in now.items() if k in saved and saved[k] != v}
    if changes:
        _say("resume: " + ", ".join(f"{k} {a:g} -> {b:g}" for k, (a, b) in changes.items())
             + " (applied from the resumed step on: the lr schedule is rebuilt for it)")
    return changes


def _check_no_newer(out: Path, ckpt: Path) -> None:
    """Resuming an earlier checkpoint of --output-dir would write a second timeline among the first one's newer
    checkpoints (and a later --resume would take theirs): refused, naming them."""
    from .train import CHECKPOINTS, checkpoint_folders, read_trainer_state

    if ckpt.resolve().parent != (out / CHECKPOINTS).resolve():
        return
    step = read_trainer_state(ckpt)["step"]
    newer = [p.name for s, p in checkpoint_folders(out / CHECKPOINTS) if s > step]
    if newer:
        raise QloraGaError(f"--output-dir {out} has checkpoints newer than {ckpt.name} ({', '.join(sorted(newer))}): "
                           "continuing from it would mix two runs; resume the newest (--resume alone), move the newer "
                           "ones away, or resume into another --output-dir")


def _setting(cfg: FinetuneConfig, key: str):
    value = getattr(cfg, key)
    if key in ("model", "dataset") and value and Path(value).exists():  # a local path: the same however it is written
        value = str(Path(value).resolve())
    return value


def _run_record(cfg: FinetuneConfig, model, data, targets) -> dict:
    """What a checkpoint records to check a resume: the fixed settings, the process count, the model's shape
    and a fingerprint of the tokenized training data (a changed file under the same name is found too)."""
    import hashlib
    from array import array

    h = hashlib.sha256()
    for ex in data.train:
        h.update(array("q", ex["input_ids"]).tobytes() + b"|" + array("q", ex["labels"]).tobytes() + b"\n")
    c = model.config
    shape = {k: getattr(c, k, None) for k in ("model_type", "hidden_size", "num_hidden_layers", "vocab_size")}
    settings = {k: _setting(cfg, k) for k in RESUME_FIXED}
    return {"settings": settings, "processes": distributed.world(), "model_shape": shape,
            "adapted_linears": ",".join(targets), "data_fingerprint": h.hexdigest()[:16]}


def _check_resume(cfg: FinetuneConfig, ckpt: Path, record: dict | None = None) -> dict:
    """Refuse a resume whose fixed settings differ from the checkpoint's (one line naming each); with ``record``
    (after loading) also the model's shape and the data. Returns the applied settings that changed."""
    from .train import read_trainer_state

    st = read_trainer_state(ckpt)
    saved = st.get("settings")
    if not isinstance(saved, dict):
        if record is None:
            _say(f"note: checkpoint {ckpt} records no settings (written by an older version): they are not checked")
        return {}
    redo = f"resume with the run's own settings (--config {ckpt.parents[1] / 'run_config.yaml'} --resume) or start a new run"
    if record is None:
        now = {k: _setting(cfg, k) for k in RESUME_FIXED if k in saved}
        diff = [f"{k} {saved[k]!r} -> {v!r}" for k, v in now.items() if saved[k] != v]
        if diff:
            raise QloraGaError(f"checkpoint {ckpt} was written with other settings ({'; '.join(diff)}): {redo}")
        return {}
    diff = []
    if st.get("adapted_linears") and st["adapted_linears"] != record["adapted_linears"]:
        diff.append(f"adapted linears {st['adapted_linears']!r} -> {record['adapted_linears']!r}")
    if st.get("model_shape") and st["model_shape"] != record["model_shape"]:
        diff.append(f"model {st['model_shape']} -> {record['model_shape']}")
    if st.get("data_fingerprint") and st["data_fingerprint"] != record["data_fingerprint"]:
        diff.append("the tokenized training data (the dataset file's content changed)")
    if diff:
        raise QloraGaError(f"checkpoint {ckpt} was written with other settings ({'; '.join(diff)}): {redo}")
    old = {"lr": st.get("lr"), "warmup": st.get("warmup"), "weight_decay": st.get("weight_decay"),
           "total_steps": st.get("total_steps")}
    return {k: v for k, v in old.items() if v is not None}


def _load(cfg: FinetuneConfig, device, records=None):
    """Step 1: the 4-bit model, its tokenizer, the tokenized data and the target linears."""
    import torch

    from .data.build import build_data
    from .arch import resolve_targets, target_linears, unadapted_experts
    from .model import load_model

    torch.manual_seed(cfg.seed)
    _say(f"loading {cfg.model or 'the built-in SmolLM2-135M-Instruct'} in 4-bit on {device} ...")
    with distributed.main_first():  # the main process fills the caches (a GGUF's conversion, the dataset) first
        model, tok = load_model(cfg.model, device=device, compute_dtype=cfg.compute_dtype)
    if cfg.liger:
        from .kernels import apply_liger

        _say(f"Liger Kernel: fused kernels for {apply_liger(model, device)}")
    with distributed.main_first():
        data = build_data(tok, cfg.data_config(), records)
    st = data.stats
    _say(f"data: {st.n_train} train / {st.n_eval} eval examples, {st.n_label_tokens} label tokens "
         f"(dropped {st.n_empty_dropped} empty, {st.n_overlong_dropped} over-long; truncated {st.n_truncated})")
    targets = resolve_targets(model, cfg.target_modules_list)
    _say(f"adapters on {len(target_linears(model, targets))} linears ({', '.join(targets)})")
    for experts in unadapted_experts(model):
        _say(f"note: {experts} keeps its expert weights fused in 3-D tensors, which get no adapters; "
             "attention and dense linears do, with an exact gradient init")
    if getattr(model.config, "output_router_logits", False) and cfg.is_gradient_init:
        _say("note: training adds the MoE router's auxiliary loss (output_router_logits); the gradient init is "
             "exact for the language-model loss alone")
    return model, tok, data, targets


def _resume_adapters(model, cfg: FinetuneConfig, ckpt: Path, out: Path, lora_kw: dict):
    """The adapters of a checkpoint (their starting values are in it: no gradient pass needed)."""
    from safetensors.torch import load_file

    from .init import init_adapters
    from .ranks import checkpoint_rank_pattern
    from .train import checkpoint_adapter_file, load_checkpoint_weights

    _say(f"resuming from {ckpt}")
    # per-module ranks (--rank-allocation gradient) are read back from the checkpoint's own shapes
    pattern = checkpoint_rank_pattern(load_file(checkpoint_adapter_file(ckpt)), cfg.rank, cfg.rank_allocation)
    pm = init_adapters(model, None, method="kaiming", rank_pattern=pattern, **lora_kw)
    try:
        load_checkpoint_weights(pm, ckpt)
    except (RuntimeError, KeyError) as e:
        raise QloraGaError(
            f"checkpoint {ckpt} does not fit the current settings ({str(e).strip().splitlines()[0][:120]}): "
            f"resume with the run's own settings, --config {out / 'run_config.yaml'} --resume"
        ) from None
    return pm


def _checkpoint_step(ckpt: Path) -> int:
    from .train import read_trainer_state

    return read_trainer_state(ckpt)["step"]


def _padding_free(cfg: FinetuneConfig, model) -> bool:
    """Whether this model's micro-batches are flattened (--padding-free, --packing): decided per model by
    ``data.padding_free_support`` and said in one line; --packing on a model without that support is refused."""
    from .train import padding_free_decision

    return padding_free_decision(model, cfg.train_settings(), say=_say)


def _estimate_and_init(model, tok, data, cfg: FinetuneConfig, targets: list[str], lora_kw: dict, padding_free: bool = False):
    """Steps 2 and 3: the gradient pass (for gradient inits or gradient rank allocation), then the adapters.
    Returns the PEFT model and the pass's report (None without a pass)."""
    from .data.batch import sample_batch
    from .estimate import PassReport, describe_plan, estimate_factors
    from .init import factor_reducer, init_adapters, singular_vectors_needed
    from .methods import GRADIENT_METHODS

    factors, init_report, pattern = None, None, {}
    by_gradient = cfg.rank_allocation == "gradient"
    if cfg.init in GRADIENT_METHODS or by_gradient:
        from .ranks import rank_bounds

        sample = sample_batch(data.train, cfg.init_samples, cfg.seed)
        report = PassReport()
        # gradient allocation: keep the singular triplets of the largest rank a module may get
        keep = rank_bounds(cfg.rank)[1] if by_gradient else cfg.rank
        factors = estimate_factors(
            model, sample, rank=cfg.rank, target_modules=targets, n_vectors=singular_vectors_needed(cfg.init, cfg.rank),
            reducer=factor_reducer(cfg.init, keep, cfg.gamma), micro_batch_size=cfg.init_micro_batch,
            pad_token_id=tok.pad_token_id, padding_free=padding_free, report=report, progress=distributed.is_main(),
            on_plan=lambda r: _say(describe_plan(r, str(next(model.parameters()).device))),
        )
        init_report = asdict(report)
        _say(f"gradient pass: {report.n_sequences} sequences, {report.n_label_tokens} label tokens, "
             f"{report.seconds:.1f} s, sample loss {report.loss:.4f}")
        zero = report.zero_gradient_modules
        if zero:
            names = ", ".join(zero[:3]) + (f" and {len(zero) - 3} more" if len(zero) > 3 else "")
            _say(f"note: {len(zero)} of {len(factors)} target modules got no gradient from the init sample ({names})"
                 + ("; they start as vanilla LoRA (random A, B = 0)" if cfg.init in GRADIENT_METHODS else "")
                 + "; listed in init_report.json")
        if by_gradient:
            pattern = _allocate_ranks(factors, cfg, init_report)
        if cfg.init not in GRADIENT_METHODS:
            factors = None
    return init_adapters(model, factors, method=cfg.init, gamma=cfg.gamma, rank_pattern=pattern, **lora_kw), init_report


def _allocate_ranks(factors: dict, cfg: FinetuneConfig, init_report: dict) -> dict:
    """``--rank-allocation gradient``: per-module ranks under uniform rank r's budget (recorded in the report)."""
    from .ranks import allocate_ranks, rank_pattern, trainable_count

    ranks = allocate_ranks(factors, cfg.rank, cfg.init)
    shapes = {n: f.shape for n, f in factors.items()}
    init_report["ranks"] = ranks
    init_report["trainable_parameters"] = {"gradient": trainable_count(ranks, shapes),
                                           "uniform": trainable_count(dict.fromkeys(ranks, cfg.rank), shapes)}
    _say(f"ranks from the gradient: {min(ranks.values())}..{max(ranks.values())} "
         f"({init_report['trainable_parameters']['gradient']} trainable parameters, uniform rank "
         f"{cfg.rank}: {init_report['trainable_parameters']['uniform']})")
    return rank_pattern(ranks, cfg.rank)


def _compute_dtype(pm):
    """The compute dtype the model was loaded in."""
    import torch

    dtype = pm.get_base_model().config.dtype
    return dtype if isinstance(dtype, torch.dtype) else getattr(torch, str(dtype))


def _learning_rate(cfg: FinetuneConfig, pm, tok, data, ckpt) -> tuple[FinetuneConfig, dict | None]:
    """``--lr auto``: the settings with the lr the line search finds (qlora_ga.train.autolr) and its report; a
    resumed run takes the lr its checkpoint recorded. Other settings come back unchanged."""
    from .config import AUTO_LR
    from .methods import method_defaults

    if cfg.lr != AUTO_LR or cfg.max_steps == 0:
        return cfg, None
    if ckpt is not None:
        from .train import read_trainer_state

        lr = read_trainer_state(ckpt).get("lr")
        if not isinstance(lr, (int, float)):
            raise QloraGaError(f"checkpoint {ckpt} does not record the lr it was trained with: resume with the run's --lr number")
        _say(f"lr auto: {lr:.4g}, found when the run started (from {ckpt.name})")
        return replace(cfg, lr=float(lr)), None
    from .train.autolr import find_lr
    from .train import StepBatches, total_steps

    s = replace(cfg, lr=None).train_settings()
    world = distributed.world()
    first = [ex for mb in StepBatches(data.train, s, world=world).examples(0)  # every process's
             for ex in (sum(mb, []) if s.packing else mb)]  # (packing: a micro-batch is rows of examples)
    search = find_lr(pm, first, tok.pad_token_id, start=method_defaults(cfg.init)["lr"],
                     steps=total_steps(len(data.train), s, world, data.train),
                     batch_size=cfg.batch_size, compute_dtype=_compute_dtype(pm), gradient_checkpointing=s.gradient_checkpointing)
    lr = distributed.gather_objects(search.lr)[0]  # every process trains with the main process's lr
    _say(search.line())
    return replace(cfg, lr=lr), search.as_dict()


def _write_run_files(cfg: FinetuneConfig, out: Path, ckpt, init_report, lr_search: dict | None = None,
                     changes: dict | None = None) -> bool:
    """Set an old run aside (``--overwrite``: it stays in ``.previous-run`` until the new one has saved), then write
    the run's config, the pass's report and ``--lr auto``'s search (main process). A resume keeps the run's
    ``run_config.yaml`` as it was and adds a line to ``resumes.jsonl``. Returns whether an old run was set aside."""
    replacing = False
    if distributed.is_main():
        if cfg.overwrite and not ckpt and out.is_dir():
            replacing = _set_aside_previous(out)
        out.mkdir(parents=True, exist_ok=True)
        if ckpt is None or not (out / "run_config.yaml").is_file():  # (a checkpoint of another folder's run)
            save_yaml(replace(cfg, resume=None), out / "run_config.yaml")
        if ckpt is not None:
            from .train import read_trainer_state

            line = {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "checkpoint": str(ckpt),
                    "step": read_trainer_state(ckpt)["step"], "changed": changes or {}}
            old = (out / RESUMES).read_text() if (out / RESUMES).is_file() else ""
            atomic_write(out / RESUMES, old + json.dumps(line) + "\n")
        if ckpt is None and init_report is not None:
            _write_json(out / "init_report.json", init_report)
        if lr_search is not None:
            _write_json(out / LR_SEARCH, lr_search)
    distributed.barrier()
    return replacing


def _train(cfg: FinetuneConfig, pm, tok, data, out: Path, start_step: int, ckpt, record: dict, on_saved=None,
           padding_free: bool = False) -> dict:
    """Step 4: training, with the reporter (main process) and the loss plot; ``padding_free``: the model's decision
    (:func:`_padding_free`)."""
    from .metrics import make_reporter, plot_losses
    from .train import train

    compute_dtype = _compute_dtype(pm)
    stop_after = int(os.environ["QLORA_GA_STOP_AFTER"]) if os.environ.get("QLORA_GA_STOP_AFTER") else None
    reporter = (make_reporter(cfg.report_to, out, to_dict(cfg), resume_step=start_step if ckpt else None)
                if distributed.is_main() else None)
    try:
        result = train(pm, tok, data.train, data.eval, cfg.train_settings(), out, start_step=start_step, checkpoint=ckpt,
                       compute_dtype=compute_dtype, stop_after=stop_after, progress=distributed.is_main(),
                       reporter=reporter, record=record, on_saved=on_saved, flat=padding_free)
    finally:
        if reporter is not None:
            reporter.close()
    if distributed.is_main() and (out / "metrics.jsonl").is_file():
        plot_losses(out / "metrics.jsonl", out / "loss.png", title=f"{cfg.init}, r={cfg.rank}, lr={cfg.lr:g}")
    return result


def _export(cfg: FinetuneConfig, pm, out: Path):
    """Step 5: the PEFT adapter, and the merged / GGUF exports when asked for."""
    from .export import merge_export, save_adapter

    save_adapter(pm, out / "adapter")
    _say(f"adapter written to {out / 'adapter'} (PEFT format)")
    if cfg.export_merged:
        merge_export(out / "adapter", out / "merged", dtype=cfg.merged_dtype)
        _say(f"merged {cfg.merged_dtype} model written to {out / 'merged'}")
    if cfg.export_gguf:
        from .export.gguf import gguf_export

        g = gguf_export(out / "adapter", out / "gguf", cfg.export_gguf, llama_cpp=cfg.llama_cpp,
                        merged_dir=out / "merged" if cfg.export_merged else None)  # merged once, not twice
        _say(f"GGUF {cfg.export_gguf} written to {g.gguf_file} ({g.bytes / 1e6:.1f} MB) with an Ollama Modelfile")


def _write_json(path: Path, obj):
    atomic_write(path, json.dumps(obj, indent=1, default=str))


def main(argv: list[str] | None = None) -> int:
    """Run the tool; return the exit code. Under a launcher, every process runs this: bad input (the
    same on all of them) is reported by the main one; a failure of one process ends it at once, and
    the launcher then stops the others."""
    quiet_libraries()
    code = _main(argv)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # under a launcher (distributed.launched, without importing torch)
        if code == 0:
            distributed.finish()
        else:  # leave now, without waiting for processes that may sit in a collective
            if code == 2:  # bad input, met by every process at about the same moment: let each exit with 2
                signal.signal(signal.SIGTERM, signal.SIG_IGN)  # before the launcher, seeing the first, stops the rest
                time.sleep(LAUNCHED_ERROR_GRACE_S)
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    return code


def _resume_settings(cfg: FinetuneConfig, argv: list[str] | None) -> FinetuneConfig:
    """``--resume``: the run's own ``run_config.yaml`` is the base and the command line's flags override it (as with
    ``--config``), so a plain ``--resume`` continues the run as it was, not with the defaults of options left out."""
    if not cfg.resume:
        return cfg
    if cfg.overwrite:
        raise QloraGaError("--resume continues the run in --output-dir and --overwrite replaces it: pass one of them")
    if cfg.config is not None or argv is None:  # the user's own base, or settings given whole (the Python API)
        return cfg
    ckpt = Path(cfg.resume)
    run_dir = Path(cfg.output_dir) if cfg.resume == "latest" else ckpt.parents[1] if len(ckpt.parts) > 2 else None
    saved = run_dir / "run_config.yaml" if run_dir is not None else None
    if saved is None or not saved.is_file():
        return cfg
    _say(f"resume: the run's settings from {saved}, with the command line's flags over them")
    merged = parse_config(["--config", str(saved), *argv, "--overwrite", "false"])
    return replace(merged, config=None, overwrite=False, output_dir=cfg.output_dir, resume=cfg.resume)


def _main(argv: list[str] | None) -> int:
    # (the launcher's RANK, from the environment: torch is not imported before the arguments are checked)
    main_process = os.environ.get("RANK", "0") == "0"
    where = f"process {os.environ.get('RANK', '0')}: " if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""
    try:
        argv = list(sys.argv[1:] if argv is None else argv)
        run(apply_demo_preset(parse_config(argv)), argv)
        return 0
    except QloraGaError as e:
        if main_process:  # the same on every process
            print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if main_process:
            print("interrupted: the last checkpoint is kept; continue with --resume", file=sys.stderr)
        return 130
    except MemoryError:
        print(f"error: {where}out of host memory: lower --batch-size, --max-length or --init-samples", file=sys.stderr)
        return 2
    except Exception as e:  # CUDA out-of-memory is a RuntimeError subclass
        import torch

        if isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower():
            print(f"error: {where}out of GPU memory: lower --batch-size (raise --grad-accum to keep the effective batch), "
                  "--max-length, or --init-samples / --init-micro-batch for the gradient pass", file=sys.stderr)
            return 2
        if distributed.launched():  # leave at once (see main)
            if distributed.peer_failed(e):  # a consequence: the failing process has said why
                print(f"error: {where}stopped: another process failed (its error is above)", file=sys.stderr)
            else:
                import traceback

                traceback.print_exc()
            return 1
        raise


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
