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

from . import distributed
from .config import FinetuneConfig, parse_config, resolved, save_yaml, to_dict
from .constants import ADAPTER_WEIGHTS, IGNORE_INDEX
from .errors import QloraGaError
from .fileio import atomic_write
from .log import quiet_libraries

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

RUN_MARKERS = ("run_config.yaml", "metrics.jsonl", "checkpoints", "adapter", "init_report.json")


def _say(msg: str):
    if distributed.is_main():
        print(msg, flush=True)


def check_output_dir(cfg: FinetuneConfig) -> Path:
    out = Path(cfg.output_dir)
    if out.exists() and not out.is_dir():
        raise QloraGaError(f"--output-dir '{out}' is a file: pass a folder")
    holds_run = out.is_dir() and any((out / m).exists() for m in RUN_MARKERS)
    if holds_run and not cfg.resume and not cfg.overwrite:
        raise QloraGaError(f"--output-dir '{out}' already holds a run: pass --resume to continue it, --overwrite to replace it, or another --output-dir")
    return out


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


def run(cfg: FinetuneConfig) -> dict:
    """The whole job for a parsed config; returns a summary (also written to ``summary.json``)."""
    import torch

    from .data.batch import sample_batch
    from .data.build import build_data
    from .gradient import PassReport, estimate_factors
    from .init import factor_reducer, init_adapters, singular_vectors_needed
    from .methods import GRADIENT_METHODS
    from .metrics import make_reporter, plot_losses
    from .model import load_model, resolve_targets, target_linears, unadapted_experts
    from .train import find_checkpoint, load_checkpoint_weights, train

    cfg = resolved(cfg)
    device = resolve_device(cfg)
    out = check_output_dir(cfg)
    distributed.barrier()  # every process has looked at --output-dir before the main one writes into it
    if cfg.liger:
        from .kernels import check_liger

        check_liger(device)  # before anything is loaded or written
    with distributed.main_first():  # the main process fetches the GGUF converter into the cache, if asked for
        check_exports(cfg)
    t_start = time.perf_counter()
    ckpt = None
    if cfg.resume:
        ckpt = find_checkpoint(out, cfg.resume)

    torch.manual_seed(cfg.seed)
    _say(f"loading {cfg.model or 'the built-in SmolLM2-135M-Instruct'} in 4-bit on {device} ...")
    with distributed.main_first():  # the main process fills the caches (a GGUF's conversion, the dataset) first
        model, tok = load_model(cfg.model, device=device, compute_dtype=cfg.compute_dtype)
    if cfg.liger:
        from .kernels import apply_liger

        _say(f"Liger Kernel: fused kernels for {apply_liger(model, device)}")
    compute_dtype = model.config.dtype if isinstance(model.config.dtype, torch.dtype) else getattr(torch, str(model.config.dtype))
    with distributed.main_first():
        data = build_data(tok, cfg.data_config())
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
    lora_kw = dict(rank=cfg.rank, alpha=cfg.alpha, target_modules=targets, lora_dropout=cfg.lora_dropout,
                   use_rslora=cfg.use_rslora)
    prompts = _sample_prompts(data.eval or data.train, cfg.sample_prompts)
    before = show_samples(model, tok, prompts, "before training") if prompts and not ckpt and distributed.is_main() else []

    if ckpt is not None:
        _say(f"resuming from {ckpt}")
        # the adapters' starting values are in the checkpoint: no gradient pass needed
        from safetensors.torch import load_file

        from .ranks import checkpoint_rank_pattern

        # per-module ranks (--rank-allocation gradient) are read back from the checkpoint's own shapes
        pattern = checkpoint_rank_pattern(load_file(ckpt / ADAPTER_WEIGHTS), cfg.rank, cfg.rank_allocation)
        pm = init_adapters(model, None, method="kaiming", rank_pattern=pattern, **lora_kw)
        try:
            load_checkpoint_weights(pm, ckpt)
        except (RuntimeError, KeyError) as e:
            raise QloraGaError(
                f"checkpoint {ckpt} does not fit the current settings ({str(e).strip().splitlines()[0][:120]}): "
                f"resume with the run's own settings, --config {out / 'run_config.yaml'} --resume"
            ) from None
        start_step = json.loads((ckpt / "trainer_state.json").read_text())["step"]
    else:
        factors, init_report, pattern = None, None, {}
        by_gradient = cfg.rank_allocation == "gradient"
        if cfg.init in GRADIENT_METHODS or by_gradient:
            from .ranks import allocate_ranks, rank_bounds, rank_pattern, trainable_count

            sample = sample_batch(data.train, cfg.init_samples, cfg.seed)
            report = PassReport()
            # gradient allocation: keep the singular triplets of the largest rank a module may get
            keep = rank_bounds(cfg.rank)[1] if by_gradient else cfg.rank
            factors = estimate_factors(
                model, sample, rank=cfg.rank, target_modules=targets, n_vectors=singular_vectors_needed(cfg.init, cfg.rank),
                reducer=factor_reducer(cfg.init, keep, cfg.gamma), micro_batch_size=cfg.init_micro_batch,
                pad_token_id=tok.pad_token_id, report=report, progress=distributed.is_main(),
            )
            init_report = asdict(report)
            _say(f"gradient pass: {report.n_sequences} sequences, {report.n_label_tokens} label tokens, "
                 f"{report.seconds:.1f} s, sample loss {report.loss:.4f}")
            if by_gradient:
                ranks = allocate_ranks(factors, cfg.rank, cfg.init)
                pattern = rank_pattern(ranks, cfg.rank)
                shapes = {n: f.shape for n, f in factors.items()}
                init_report["ranks"] = ranks
                init_report["trainable_parameters"] = {"gradient": trainable_count(ranks, shapes),
                                                       "uniform": trainable_count(dict.fromkeys(ranks, cfg.rank), shapes)}
                _say(f"ranks from the gradient: {min(ranks.values())}..{max(ranks.values())} "
                     f"({init_report['trainable_parameters']['gradient']} trainable parameters, uniform rank "
                     f"{cfg.rank}: {init_report['trainable_parameters']['uniform']})")
            if cfg.init not in GRADIENT_METHODS:
                factors = None
        pm = init_adapters(model, factors, method=cfg.init, gamma=cfg.gamma, rank_pattern=pattern, **lora_kw)
        start_step = 0

    # Everything the run needs is in hand: only now is an old run (with --overwrite) replaced.
    if distributed.is_main():
        if cfg.overwrite and not ckpt and out.is_dir():
            for m in RUN_MARKERS + ("loss.png", "summary.json", "merged", "gguf", "tensorboard", "wandb"):
                p = out / m
                shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
        out.mkdir(parents=True, exist_ok=True)
        save_yaml(cfg, out / "run_config.yaml")
        if ckpt is None and init_report is not None:
            _write_json(out / "init_report.json", init_report)
    distributed.barrier()

    settings = cfg.train_settings()
    summary = {"output_dir": str(out), "init": cfg.init}
    if cfg.max_steps != 0:
        stop_after = int(os.environ["QLORA_GA_STOP_AFTER"]) if os.environ.get("QLORA_GA_STOP_AFTER") else None
        reporter = (make_reporter(cfg.report_to, out, to_dict(cfg), resume_step=start_step if ckpt else None)
                    if distributed.is_main() else None)
        try:
            summary.update(train(pm, tok, data.train, data.eval, settings, out, start_step=start_step, checkpoint=ckpt,
                                 compute_dtype=compute_dtype, stop_after=stop_after, progress=distributed.is_main(),
                                 reporter=reporter))
        finally:
            if reporter is not None:
                reporter.close()
        if distributed.is_main() and (out / "metrics.jsonl").is_file():
            plot_losses(out / "metrics.jsonl", out / "loss.png", title=f"{cfg.init}, r={cfg.rank}, lr={cfg.lr:g}")

    from .export import merge_export, save_adapter

    if not distributed.is_main():  # the processes' adapters are the same: the main one writes it
        return summary
    save_adapter(pm, out / "adapter")
    _say(f"adapter written to {out / 'adapter'} (PEFT format)")
    after = show_samples(pm, tok, prompts, "after training") if prompts and cfg.max_steps != 0 else []
    if cfg.export_merged:
        merge_export(out / "adapter", out / "merged", dtype=cfg.merged_dtype)
        _say(f"merged {cfg.merged_dtype} model written to {out / 'merged'}")
    if cfg.export_gguf:
        from .export.gguf import gguf_export

        g = gguf_export(out / "adapter", out / "gguf", cfg.export_gguf, llama_cpp=cfg.llama_cpp,
                        merged_dir=out / "merged" if cfg.export_merged else None)  # merged once, not twice
        _say(f"GGUF {cfg.export_gguf} written to {g.gguf_file} ({g.bytes / 1e6:.1f} MB) with an Ollama Modelfile")
    if "eval_loss_start" in summary and "eval_loss" in summary:
        _say(f"held-out loss: {summary['eval_loss_start']:.4f} at the start -> {summary['eval_loss']:.4f} after {summary['steps']} steps")
    summary.update(seconds=round(time.perf_counter() - t_start, 1), samples_before=before, samples_after=after)
    _write_json(out / "summary.json", summary)
    _say(f"done in {summary['seconds']} s: {out}")
    return summary


def _write_json(path: Path, obj):
    atomic_write(path, json.dumps(obj, indent=1, default=str))


def main(argv: list[str] | None = None) -> int:
    """Run the tool; return the exit code. Under a launcher, every process runs this: bad input (the
    same on all of them) is reported by the main one; a failure of one process ends it at once, and
    the launcher then stops the others."""
    quiet_libraries()
    code = _main(argv)
    if distributed.launched():
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


def _main(argv: list[str] | None) -> int:
    where = f"process {distributed.rank()}: " if distributed.launched() else ""  # (the launcher's RANK)
    try:
        cfg = apply_demo_preset(parse_config(argv))
        run(cfg)
        return 0
    except QloraGaError as e:
        if distributed.is_main():  # the same on every process
            print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if distributed.is_main():
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
