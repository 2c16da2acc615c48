"""``--resume``: the run's own settings under the command line's flags, the checks that a checkpoint belongs to this
run (settings, model shape, data), what a resume may change (lr, warmup, length), and the adapters read back."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from .config import FinetuneConfig, parse_config
from .errors import QloraGaError
from .log import distributed, say

#: the settings that decide a run's data order and adapters: a --resume must not change them
RESUME_FIXED = ("model", "dataset", "format", "prompt_column", "response_column", "messages_column", "text_column",
                "max_length", "overlong", "n_builtin", "eval_split", "batch_size", "grad_accum", "seed",
                "group_by_length", "init", "init_samples", "rank", "alpha", "gamma", "target_modules", "rank_allocation",
                "lora_dropout", "compute_dtype", "optim", "padding_free", "packing")
#: the settings a --resume may change, applied from the resumed step on (lr, warmup and length rebuild the schedule)
RESUME_APPLIED = ("lr", "warmup", "weight_decay", "max_steps", "epochs", "max_grad_norm")


def resume_settings(cfg: FinetuneConfig, argv: list[str] | None) -> FinetuneConfig:
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
    say(f"resume: the run's settings from {saved}, with the command line's flags over them")
    merged = parse_config(["--config", str(saved), *argv, "--overwrite", "false"])
    return replace(merged, config=None, overwrite=False, output_dir=cfg.output_dir, resume=cfg.resume)


def check_resume(cfg: FinetuneConfig, ckpt: Path, record: dict | None = None) -> dict:
    """Refuse a resume whose fixed settings differ from the checkpoint's (one line naming each); with ``record``
    (after loading) also the model's shape and the data. Returns the applied settings that changed."""
    from .train import read_trainer_state

    st = read_trainer_state(ckpt)
    saved = st.get("settings")
    if not isinstance(saved, dict):
        if record is None:
            say(f"note: checkpoint {ckpt} records no settings (written by an older version): they are not checked")
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


def check_no_newer(out: Path, ckpt: Path) -> None:
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


def run_record(cfg: FinetuneConfig, model, data, targets) -> dict:
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


def schedule_changes(saved: dict, cfg: FinetuneConfig, data) -> dict:
    """The lr / warmup / weight decay / run length a resume changes: applied from the resumed step on (train
    rebuilds the schedule for them), said here and recorded in resumes.jsonl. ``{key: [old, new]}``."""
    from .train import total_steps

    now = {"lr": cfg.lr, "warmup": cfg.warmup, "weight_decay": cfg.weight_decay,
           "total_steps": total_steps(len(data.train), cfg.train_settings(), distributed.world(), data.train)}
    changes = {k: [saved[k], v] for k, v in now.items() if k in saved and saved[k] != v}
    if changes:
        say("resume: " + ", ".join(f"{k} {a:g} -> {b:g}" for k, (a, b) in changes.items())
             + " (applied from the resumed step on: the lr schedule is rebuilt for it)")
    return changes


def resume_adapters(model, cfg: FinetuneConfig, ckpt: Path, out: Path, lora_kw: dict):
    """The adapters of a checkpoint (their starting values are in it: no gradient pass needed)."""
    from safetensors.torch import load_file

    from .init import init_adapters
    from .ranks import checkpoint_rank_pattern
    from .train import checkpoint_adapter_file, load_checkpoint_weights

    say(f"resuming from {ckpt}")
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


def checkpoint_step(ckpt: Path) -> int:
    from .train import read_trainer_state

    return read_trainer_state(ckpt)["step"]
