"""``qlora-ga finetune`` (``scripts/finetune.py``): load -> estimate -> init -> train -> export, as one command.

:func:`run` is the whole job; each step below is one function, in the order it runs. Every user mistake ends with
one line on stderr and exit code 2 (no traceback, :mod:`qlora_ga.cli`); nothing already saved is removed or
half-written (:mod:`qlora_ga.outdir`).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, replace
from pathlib import Path

from .config import FinetuneConfig, resolved, save_yaml, to_dict
from .constants import IGNORE_INDEX
from .errors import QloraGaError
from .fileio import atomic_write
from .log import distributed, say
from .outdir import (LR_SEARCH, PREVIOUS_RUN, RESUMES, check_output_dir, drop_previous, restore_previous,
                     set_aside_previous, write_json)
from .resume import (check_no_newer, check_resume, checkpoint_step, resume_adapters, resume_settings, run_record,
                     schedule_changes)


def run(cfg: FinetuneConfig, argv: list[str] | None = None) -> dict:
    """The whole job for a parsed config: load -> estimate -> init -> train -> export. Returns a summary
    (also written to ``summary.json``). ``argv``: the command line it was parsed from; with ``--resume`` its
    flags then override the run's own ``run_config.yaml`` (:func:`resume_settings`)."""
    cfg, device, out, ckpt, records = _check_run(cfg, argv)
    t_start = time.perf_counter()
    model, tok, data, targets = _load(cfg, device, records)
    flat = _padding_free(cfg, model)  # (decided once: the gradient pass and training take it)
    record = run_record(cfg, model, data, targets)
    saved_schedule = check_resume(cfg, ckpt, record) if ckpt is not None else {}
    lora_kw = dict(rank=cfg.rank, alpha=cfg.alpha, target_modules=targets, lora_dropout=cfg.lora_dropout,
                   use_rslora=cfg.use_rslora)
    prompts = _sample_prompts(data.eval or data.train, cfg.sample_prompts)
    before = show_samples(model, tok, prompts, "before training") if prompts and not ckpt and distributed.is_main() else []
    if ckpt is not None:
        pm, start_step, init_report = resume_adapters(model, cfg, ckpt, out, lora_kw), checkpoint_step(ckpt), None
    else:
        pm, init_report = _estimate_and_init(model, tok, data, cfg, targets, lora_kw, padding_free=flat)
        start_step = 0
    train_cfg, lr_search = _learning_rate(cfg, pm, tok, data, ckpt)  # --lr auto: the number
    changes = schedule_changes(saved_schedule, train_cfg, data) if ckpt is not None else {}
    # everything is in hand: only now is an old run set aside (--overwrite), and it stays until the new one has saved
    replacing = _write_run_files(cfg, out, ckpt, init_report, lr_search, changes)
    try:
        summary = {"output_dir": str(out), "init": cfg.init}
        if cfg.max_steps != 0:
            summary.update(_train(train_cfg, pm, tok, data, out, start_step, ckpt, record,
                                  on_saved=(lambda _: drop_previous(out)) if replacing else None, padding_free=flat))
        if not distributed.is_main():  # the processes' adapters are the same: the main one writes it
            return summary
        _export(cfg, pm, out)
    except BaseException:
        if replacing and (out / PREVIOUS_RUN).is_dir():  # the new run saved nothing: the old one comes back
            restore_previous(out)
            say(f"the run that --overwrite was replacing is back in {out}")
        raise
    drop_previous(out)
    after = show_samples(pm, tok, prompts, "after training") if prompts and cfg.max_steps != 0 else []
    if "eval_loss_start" in summary and "eval_loss" in summary:
        say(f"held-out loss: {summary['eval_loss_start']:.4f} at the start -> {summary['eval_loss']:.4f} after {summary['steps']} steps")
    summary.update(seconds=round(time.perf_counter() - t_start, 1), samples_before=before, samples_after=after)
    write_json(out / "summary.json", summary)
    say(f"done in {summary['seconds']} s: {out}")
    return summary


def _check_run(cfg: FinetuneConfig, argv: list[str] | None = None):
    """Everything that can be checked before the model loads: device, output folder (cleaned up after a kill),
    the settings (a resume's are its run's, :func:`resume_settings`), exports, the dataset's file, format and
    columns, the checkpoint to resume and the settings it was written with. Returns the resolved settings too."""
    from .data.build import load_checked_records
    from .methods import GRADIENT_METHODS
    from .train import find_checkpoint

    device = resolve_device(cfg)
    out = check_output_dir(cfg)
    distributed.barrier()  # every process has looked at --output-dir before the main one writes into it
    cfg = resolved(resume_settings(cfg, argv))
    if cfg.liger:
        from .kernels import check_liger

        check_liger(device)  # before anything is loaded or written
    with distributed.main_first():  # the main process fetches the GGUF converter into the cache, if asked for
        check_exports(cfg)
    ckpt = None
    if cfg.resume:
        # a gradient init leaves a residual in every target: a checkpoint without its file is not the run
        ckpt = find_checkpoint(out, cfg.resume, expect_residual=cfg.init in GRADIENT_METHODS, say=say)
        check_resume(cfg, ckpt)
        if cfg.resume != "latest":  # (--resume alone takes the newest good one: what it skipped is damaged)
            check_no_newer(out, ckpt)
    with distributed.main_first():  # the main process fills the datasets cache first
        records = load_checked_records(cfg.data_config())
    return cfg, device, out, ckpt, records


def resolve_device(cfg: FinetuneConfig):
    import torch

    if distributed.launched():  # one process per GPU (LOCAL_RANK), or gloo on the CPU
        return distributed.init(cpu=cfg.device == "cpu")
    from .model import as_device

    if cfg.device and torch.device(cfg.device).type == "cuda" and not torch.cuda.is_available():
        raise QloraGaError(f"--device {cfg.device} asks for CUDA but no CUDA GPU is available: use --device cpu or run on a GPU machine")
    return as_device(cfg.device or None)


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


def _load(cfg: FinetuneConfig, device, records=None):
    """Step 1: the 4-bit model, its tokenizer, the tokenized data and the target linears."""
    import torch

    from .data.build import build_data
    from .arch import resolve_targets, target_linears, unadapted_experts
    from .model import load_model

    torch.manual_seed(cfg.seed)
    say(f"loading {cfg.model or 'the built-in SmolLM2-135M-Instruct'} in 4-bit on {device} ...")
    with distributed.main_first():  # the main process fills the caches (a GGUF's conversion, the dataset) first
        model, tok = load_model(cfg.model, device=device, compute_dtype=cfg.compute_dtype)
    if cfg.liger:
        from .kernels import apply_liger

        say(f"Liger Kernel: fused kernels for {apply_liger(model, device)}")
    with distributed.main_first():
        data = build_data(tok, cfg.data_config(), records)
    st = data.stats
    say(f"data: {st.n_train} train / {st.n_eval} eval examples, {st.n_label_tokens} label tokens "
         f"(dropped {st.n_empty_dropped} empty, {st.n_overlong_dropped} over-long; truncated {st.n_truncated})")
    targets = resolve_targets(model, cfg.target_modules_list)
    say(f"adapters on {len(target_linears(model, targets))} linears ({', '.join(targets)})")
    for experts in unadapted_experts(model):
        say(f"note: {experts} keeps its expert weights fused in 3-D tensors, which get no adapters; "
             "attention and dense linears do, with an exact gradient init")
    if getattr(model.config, "output_router_logits", False) and cfg.is_gradient_init:
        say("note: training adds the MoE router's auxiliary loss (output_router_logits); the gradient init is "
             "exact for the language-model loss alone")
    return model, tok, data, targets


def _padding_free(cfg: FinetuneConfig, model) -> bool:
    """Whether this model's micro-batches are flattened (--padding-free, --packing): decided per model by
    ``data.padding_free_support`` and said in one line; --packing on a model without that support is refused."""
    from .train import padding_free_decision

    return padding_free_decision(model, cfg.train_settings(), say=say)


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
            on_plan=lambda r: say(describe_plan(r, str(next(model.parameters()).device))),
        )
        init_report = asdict(report)
        say(f"gradient pass: {report.n_sequences} sequences, {report.n_label_tokens} label tokens, "
             f"{report.seconds:.1f} s, sample loss {report.loss:.4f}")
        zero = report.zero_gradient_modules
        if zero:
            names = ", ".join(zero[:3]) + (f" and {len(zero) - 3} more" if len(zero) > 3 else "")
            say(f"note: {len(zero)} of {len(factors)} target modules got no gradient from the init sample ({names})"
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
    say(f"ranks from the gradient: {min(ranks.values())}..{max(ranks.values())} "
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
        say(f"lr auto: {lr:.4g}, found when the run started (from {ckpt.name})")
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
    say(f"{search.line()} (--lr NUMBER sets it instead)")
    return replace(cfg, lr=lr), search.as_dict()


def _write_run_files(cfg: FinetuneConfig, out: Path, ckpt, init_report, lr_search: dict | None = None,
                     changes: dict | None = None) -> bool:
    """Set an old run aside (``--overwrite``: it stays in ``.previous-run`` until the new one has saved), then write
    the run's config, the pass's report and ``--lr auto``'s search (main process). A resume keeps the run's
    ``run_config.yaml`` as it was and adds a line to ``resumes.jsonl``. Returns whether an old run was set aside."""
    replacing = False
    if distributed.is_main():
        if cfg.overwrite and not ckpt and out.is_dir():
            replacing = set_aside_previous(out)
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
            write_json(out / "init_report.json", init_report)
        if lr_search is not None:
            write_json(out / LR_SEARCH, lr_search)
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
    say(f"adapter written to {out / 'adapter'} (PEFT format)")
    if cfg.export_merged:
        merge_export(out / "adapter", out / "merged", dtype=cfg.merged_dtype)
        say(f"merged {cfg.merged_dtype} model written to {out / 'merged'}")
    if cfg.export_gguf:
        from .export.gguf import gguf_export

        g = gguf_export(out / "adapter", out / "gguf", cfg.export_gguf, llama_cpp=cfg.llama_cpp,
                        merged_dir=out / "merged" if cfg.export_merged else None)  # merged once, not twice
        say(f"GGUF {cfg.export_gguf} written to {g.gguf_file} ({g.bytes / 1e6:.1f} MB) with an Ollama Modelfile")


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
        say(f"--- {title}\n[prompt] {tokenizer.decode(ids, skip_special_tokens=True).strip()}\n[answer] {text}")
    return outs
