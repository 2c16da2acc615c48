"""Run settings: one dataclass for every option of ``scripts/finetune.py``, from CLI flags and/or YAML.

``parse_config(argv)`` parses with transformers' :class:`~transformers.HfArgumentParser`. With
``--config FILE.yaml`` the YAML keys (field names; dashes accepted) are the base and the flags given
on the command line override them. Every mistake (unknown key or flag, a value of the wrong type,
a value out of range) is raised as a one-line :class:`~qlora_ga.errors.QloraGaError`, never as
``SystemExit`` (``--help`` still prints the help and exits 0).

``None`` in ``lr``/``alpha``/``gamma`` means "the default of the chosen init method"
(:data:`METHOD_DEFAULTS`); :func:`resolved` fills them in. ``save_yaml`` writes every field (except
``config`` itself) so that ``parse_config(["--config", saved])`` gives the same settings back.

This module is deliberately light (no torch import): the CLI can parse and validate before loading
anything heavy.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from transformers import HfArgumentParser

from .constants import DEFAULT_TARGETS, FORMATS, OVERLONG
from .errors import QloraGaError, did_you_mean
from .fileio import atomic_write
from .methods import GRADIENT_METHODS, METHOD_DEFAULTS, METHODS, default_lrs_text, method_defaults

OPTIMS = ("paged_adamw_32bit", "paged_adamw_8bit", "adamw", "lora-one-precond", "prodigy")
RANK_ALLOCATIONS = ("uniform", "gradient")
PRODIGY_LR = 1.0  # prodigy estimates its step size itself; --lr multiplies it
AUTO_LR = "auto"  # --lr auto: qlora_ga.train.autolr, after the init
AUTO_LR_OPTIMS = ("paged_adamw_32bit", "paged_adamw_8bit", "adamw")  # the Adam(W) updates its line search follows
MERGED_DTYPES = ("fp16", "bf16")
COMPUTE_DTYPES = ("auto", "bf16", "fp16", "fp32")
GGUF_TYPES = ("f16", "bf16", "q8_0", "q4_k_m")
REPORT_TO = ("none", "tensorboard", "wandb")

# fields whose value must be one of a fixed set (checked for CLI flags by argparse and for YAML
# values by FinetuneConfig.validate)
CHOICE_FIELDS = {"init": METHODS, "optim": OPTIMS, "rank_allocation": RANK_ALLOCATIONS, "format": FORMATS, "overlong": OVERLONG,
                 "merged_dtype": MERGED_DTYPES, "compute_dtype": COMPUTE_DTYPES, "report_to": REPORT_TO}


def _f(default, help: str, **extra):
    """A dataclass field with argparse metadata (``help`` plus e.g. ``choices``)."""
    return field(default=default, metadata={"help": help, **extra})


@dataclass
class FinetuneConfig:
    """Every option of ``scripts/finetune.py``; the field name is the flag (``--init_samples`` or
    ``--init-samples``) and the YAML key."""

    # --- model and data ---
    model: str | None = _f(None, "hub id, local model folder or .gguf file; default: the built-in SmolLM2-135M-Instruct GGUF")
    dataset: str | None = _f(
        None, "hub dataset id, or a local .json/.jsonl/.csv/.parquet file or folder; default: the built-in arithmetic word problems"
    )
    format: str = _f("auto", "how examples are turned into prompt/response text", choices=FORMATS)
    prompt_column: str | None = _f(None, "column holding the prompt (prompt-response format); default: guessed")
    response_column: str | None = _f(None, "column holding the response (prompt-response format); default: guessed")
    messages_column: str | None = _f(None, "column holding chat messages (messages format); default: 'messages'")
    text_column: str | None = _f(None, "column holding plain text (text format); default: 'text'")
    max_length: int = _f(512, "maximum tokens per example (prompt + response)")
    overlong: str = _f("truncate", "what to do with examples longer than --max_length", choices=OVERLONG)
    n_builtin: int = _f(400, "number of examples of the built-in arithmetic dataset")
    eval_split: str | None = _f(
        None, "held-out data: a fraction of the training data ('0.05') or a dataset split name ('test'); default: none"
    )

    # --- adapters and their initialisation ---
    rank: int = _f(8, "LoRA rank r")
    rank_allocation: str = _f(
        "uniform", "per-module ranks: 'uniform' (every module rank r) or 'gradient' (ranks from the gradient pass's "
        "spectra, same total trainable parameters as uniform r; see qlora_ga/ranks.py)", choices=RANK_ALLOCATIONS)
    alpha: float | None = _f(None, "LoRA alpha (scaling alpha/sqrt(r) with rsLoRA, else alpha/r); default: method default (16)")
    init: str = _f("lora-ga", "adapter initialisation method", choices=METHODS)
    gamma: float | None = _f(None, "scale parameter of the gradient inits (lora-ga: 16, lora-one: 128); default: method default")
    init_samples: int = _f(64, "number of sequences in the gradient sample batch of the gradient inits")
    init_micro_batch: int = _f(8, "sequences per micro-batch in the gradient pass")
    target_modules: str = _f(
        DEFAULT_TARGETS,
        "comma-separated names of the linear layers that get adapters; 'all-linear': every linear inside the decoder "
        "blocks (fused projections included; LM head and MoE routers excluded)",
    )
    lora_dropout: float = _f(0.0, "dropout on the adapter input")

    # --- training ---
    batch_size: int = _f(4, "sequences per micro-batch during training")
    grad_accum: int = _f(4, "gradient accumulation steps (effective batch = batch_size * grad_accum)")
    lr: str | None = _f(None, f"peak learning rate, or 'auto': set from a line search along Adam's first step after the "
                            f"init (qlora_ga/train/autolr.py; costs a few training steps); default: method default "
                            f"({default_lrs_text()}); with --optim prodigy {PRODIGY_LR:g} (a multiplier of its own step size)")
    epochs: float = _f(1.0, "training epochs (used when --max_steps is -1)")
    max_steps: int = _f(-1, "optimizer steps; -1: use --epochs; 0: initialise the adapters and save, no training")
    warmup: float = _f(0.03, "linear warmup: a fraction of the steps if < 1, else a number of steps")
    weight_decay: float = _f(0.0, "AdamW weight decay")
    max_grad_norm: float = _f(1.0, "gradient-norm clipping threshold (0: no clipping)")
    optim: str = _f("paged_adamw_32bit", "optimizer ('prodigy': learning-rate-free Adam, the prodigyopt package)", choices=OPTIMS)
    seed: int = _f(0, "random seed")
    no_gradient_checkpointing: bool = _f(False, "disable gradient checkpointing (faster, more memory)")
    group_by_length: bool = _f(False, "batch sequences of similar length together (less padding; the order stays seeded and resumable)")
    padding_free: bool = _f(True, "flatten each micro-batch into one row without padding (position_ids restart per sequence; "
                                  "same sequences, same loss), in training and the gradient pass, where the model's attention "
                                  "supports it (checked per model; padded otherwise, the run says why); false: always pad")
    packing: bool = _f(False, "pack whole sequences into rows of --max_length tokens (best-fit decreasing over a shuffled "
                              "window; none split, attention within each); --batch_size then counts rows, so a step is a "
                              "token budget of batch_size * grad_accum * max_length; refused for a model without that support")
    compile: bool = _f(False, "torch.compile each decoder block for training (compiled once per block shape on the first "
                              "step; graph breaks and compile time reported; falls back to eager where it cannot compile)")
    fused_lora: bool = _f(False, "each 4-bit LoRA linear (with its residual) as one autograd op with a hand-derived backward "
                                 "(the same forward bits; gradients within rounding of PEFT's); PEFT's forward where it does not apply")
    liger: bool = _f(False, "CUDA only: Liger Kernel's fused Triton kernels (RMSNorm, RoPE, SwiGLU, fused linear cross-entropy); needs pip install 'qlora-ga[liger]'")
    device: str | None = _f(None, "device ('cuda', 'cuda:1', 'cpu'); default: the current GPU, else CPU")
    compute_dtype: str = _f(
        "auto", "dtype of the 4-bit layers' compute and of the rest of the model; auto: bf16 on Ampere and newer "
        "GPUs, fp16 on older ones (T4, V100; with loss scaling), fp32 on CPU", choices=COMPUTE_DTYPES,
    )

    # --- evaluation, logging, checkpoints, export ---
    eval_every: int = _f(0, "evaluate every N optimizer steps (0: only at the end)")
    save_every: int = _f(0, "save a checkpoint every N optimizer steps (0: only at the end)")
    save_total_limit: int | None = _f(None, "keep only the newest N checkpoints (older ones are deleted once a newer one is saved); default: all")
    log_every: int = _f(1, "log metrics every N optimizer steps")
    report_to: str = _f(
        "none", "also send the metrics and the run config to tensorboard (OUTPUT_DIR/tensorboard) or wandb "
        "(WANDB_MODE=offline logs without an account)", choices=REPORT_TO,
    )
    sample_prompts: int = _f(1, "number of prompts whose generations are shown before and after training")
    output_dir: str = _f("outputs/run", "folder for checkpoints, metrics, plots and the adapter")
    resume: str | None = _f(
        None, "resume from 'latest' (the newest checkpoint in --output_dir) or a checkpoint path; '--resume' alone means latest",
        nargs="?", const="latest",
    )
    overwrite: bool = _f(False, "replace the run in --output_dir (it is kept until the new run has saved its first checkpoint)")
    export_merged: bool = _f(False, "also export a merged 16-bit model")
    merged_dtype: str = _f("fp16", "dtype of the merged export", choices=MERGED_DTYPES)
    export_gguf: str | None = _f(
        None, "also export a GGUF for llama.cpp / Ollama into OUTPUT_DIR/gguf (with an Ollama Modelfile): "
        "f16, bf16, q8_0 or q4_k_m (q4_k_m needs llama-cpp-python)",
    )
    llama_cpp: str | None = _f(
        None, "llama.cpp checkout whose convert_hf_to_gguf.py --export_gguf runs; default: fetched once from the "
        "llama-cpp-python 0.3.36 source on PyPI into the cache",
    )
    config: str | None = _f(None, "YAML file with settings; flags on the command line override it")

    # ---- derived values ----
    @property
    def target_modules_list(self) -> list[str]:
        """``target_modules`` as a list of names (whitespace and empty items dropped)."""
        return [t.strip() for t in self.target_modules.split(",") if t.strip()]

    @property
    def method(self) -> dict[str, Any]:
        """The defaults table row of ``init`` (see :data:`METHOD_DEFAULTS`)."""
        return method_defaults(self.init)

    @property
    def use_rslora(self) -> bool:
        """Whether the adapter scaling is alpha/sqrt(r) (rsLoRA) rather than alpha/r; set by ``init``."""
        return bool(method_defaults(self.init)["use_rslora"])

    @property
    def is_gradient_init(self) -> bool:
        """Whether ``init`` needs the gradient pass."""
        return self.init in GRADIENT_METHODS

    @property
    def effective_batch(self) -> int:
        return self.batch_size * self.grad_accum

    @property
    def eval_fraction(self) -> float | None:
        """The eval fraction if ``eval_split`` is a number ('0.05'), else None."""
        return _as_float(self.eval_split)

    @property
    def eval_split_name(self) -> str | None:
        """The eval split name if ``eval_split`` is a name ('test'), else None."""
        return self.eval_split if self.eval_split is not None and _as_float(self.eval_split) is None else None

    # ---- the steps' own settings ----
    def data_config(self):
        """The :class:`~qlora_ga.data.DataConfig` of this run (see :func:`settings_for`)."""
        from .data.config import DataConfig

        eval_split = self.eval_fraction if self.eval_fraction is not None else self.eval_split_name
        return settings_for(self, DataConfig, eval_split=eval_split)

    def train_settings(self):
        """The :class:`~qlora_ga.train.TrainSettings` of this run (see :func:`settings_for`); ``lr`` as given, so
        call it on :func:`resolved` settings."""
        from .train import TrainSettings

        return settings_for(self, TrainSettings, gradient_checkpointing=not self.no_gradient_checkpointing)

    # ---- checks ----
    def validate(self) -> "FinetuneConfig":
        """Raise :class:`QloraGaError` (one line: what is wrong, what to do) for an invalid setting; return self."""
        for name, choices in CHOICE_FIELDS.items():
            value = getattr(self, name)
            if value not in choices:
                raise QloraGaError(f"{name} '{value}' is not known{did_you_mean(str(value), choices)}: use one of {', '.join(choices)}")
        if self.export_gguf is not None and self.export_gguf not in GGUF_TYPES:
            raise QloraGaError(
                f"export_gguf '{self.export_gguf}' is not a GGUF type{did_you_mean(self.export_gguf, GGUF_TYPES)}: use one of {', '.join(GGUF_TYPES)}"
            )
        _check(self.rank >= 1, f"rank must be >= 1, got {self.rank}: pass e.g. --rank 8")
        _check(
            self.rank_allocation == "uniform" or self.init not in ("lora-ga-sign", "lora-ga-adam"),
            f"rank_allocation gradient does not support init {self.init}: use --rank_allocation uniform, or another init",
        )
        self.lr = _lr_value(self.lr)
        _check(
            self.lr != AUTO_LR or self.optim in AUTO_LR_OPTIMS,
            f"lr auto searches along Adam's first step, not {self.optim}'s: use --optim {' / '.join(AUTO_LR_OPTIMS)}, or pass a number",
        )
        _check(self.alpha is None or self.alpha > 0, f"alpha must be > 0, got {self.alpha}: pass e.g. --alpha 16, or leave it out")
        _check(self.gamma is None or self.gamma > 0, f"gamma must be > 0, got {self.gamma}: pass e.g. --gamma 16, or leave it out")
        _check(self.max_length >= 8, f"max_length must be >= 8, got {self.max_length}: pass e.g. --max_length 512")
        _check(self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}: pass e.g. --batch_size 4")
        _check(self.grad_accum >= 1, f"grad_accum must be >= 1, got {self.grad_accum}: pass e.g. --grad_accum 4")
        _check(self.max_steps >= -1, f"max_steps must be -1, 0 or > 0, got {self.max_steps}: pass -1 to train for --epochs, 0 to only initialise, or a step count")
        _check(
            self.max_steps >= 0 or self.epochs > 0,
            f"epochs must be > 0 when max_steps is -1, got {self.epochs}: pass e.g. --epochs 1 or --max_steps 100",
        )
        _check(self.init_samples >= 1, f"init_samples must be >= 1, got {self.init_samples}: pass e.g. --init_samples 64")
        _check(self.init_micro_batch >= 1, f"init_micro_batch must be >= 1, got {self.init_micro_batch}: pass e.g. --init_micro_batch 8")
        _check(bool(self.target_modules_list), "target_modules is empty: pass e.g. --target_modules q_proj,v_proj")
        _check(
            self.warmup >= 0 and (self.warmup < 1 or float(self.warmup).is_integer()),
            f"warmup must be a fraction in [0, 1) or a whole number of steps, got {self.warmup}: pass e.g. --warmup 0.03 or --warmup 10",
        )
        _check(self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}: pass e.g. --weight_decay 0")
        _check(self.max_grad_norm >= 0, f"max_grad_norm must be >= 0, got {self.max_grad_norm}: pass e.g. --max_grad_norm 1.0, or 0 for no clipping")
        _check(0 <= self.lora_dropout < 1, f"lora_dropout must be in [0, 1), got {self.lora_dropout}: pass e.g. --lora_dropout 0.05")
        _check(self.eval_every >= 0, f"eval_every must be >= 0, got {self.eval_every}: pass a step interval, or 0 to evaluate only at the end")
        _check(self.save_every >= 0, f"save_every must be >= 0, got {self.save_every}: pass a step interval, or 0 to save only at the end")
        _check(self.save_total_limit is None or self.save_total_limit >= 1,
               f"save_total_limit must be >= 1, got {self.save_total_limit}: pass e.g. --save_total_limit 3, or leave it out to keep all")
        _check(self.log_every >= 1, f"log_every must be >= 1, got {self.log_every}: pass e.g. --log_every 10")
        _check(self.n_builtin >= 1, f"n_builtin must be >= 1, got {self.n_builtin}: pass e.g. --n_builtin 400")
        _check(self.sample_prompts >= 0, f"sample_prompts must be >= 0, got {self.sample_prompts}: pass 0 to show no samples")
        _check(bool(self.output_dir and self.output_dir.strip()), "output_dir is empty: pass e.g. --output_dir outputs/run")
        _check(self.resume is None or self.resume.strip() != "", "resume is empty: pass --resume latest or a checkpoint path")
        if self.eval_split is not None:
            f = _as_float(self.eval_split)
            if f is not None:
                _check(
                    0 < f < 1,
                    f"eval_split '{self.eval_split}' is a number outside (0, 1): pass a fraction like 0.05 or a split name like test",
                )
            else:
                _check(
                    re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.\-\[\]:%]*", self.eval_split) is not None,
                    f"eval_split '{self.eval_split}' is neither a fraction nor a split name: pass e.g. 0.05 or test",
                )
        if self.device is not None:
            _check(
                re.fullmatch(r"[a-z]+(:\d+)?", self.device) is not None,
                f"device '{self.device}' is not a device name: pass e.g. cuda, cuda:1 or cpu",
            )
        return self


def _lr_value(lr: str | float | None) -> float | str | None:
    """``--lr`` as a positive float, ``"auto"`` or None (the method default); one-line error otherwise."""
    if lr is None or lr == AUTO_LR:
        return lr
    value = _as_float(str(lr).strip())
    _check(value is not None and value > 0 and math.isfinite(value),
           f"lr must be a number > 0 or 'auto', got {lr}: pass e.g. --lr 5e-5 or --lr auto, or leave it out for the method default")
    return value


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise QloraGaError(message)


def _as_float(s: str | None) -> float | None:
    if s is None:
        return None
    try:
        return float(s)
    except ValueError:
        return None


FIELD_NAMES = tuple(f.name for f in dataclasses.fields(FinetuneConfig))


def settings_for(cfg: FinetuneConfig, cls, **derived):
    """An instance of the dataclass ``cls`` (a step's own settings, e.g. ``DataConfig``, ``TrainSettings``) with every
    field that ``FinetuneConfig`` has under the same name taken from ``cfg``, and ``derived`` for the others.

    The one mapping from the run's settings to the steps': an option is added to ``FinetuneConfig`` and to the
    step that uses it, under the same name, and nothing copies it by hand.
    """
    shared = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cls) if f.name in FIELD_NAMES and f.name not in derived}
    return cls(**shared, **derived)


def resolved(cfg: FinetuneConfig) -> FinetuneConfig:
    """A copy of ``cfg`` with ``lr``, ``alpha`` and ``gamma`` left at None filled from :func:`method_defaults`."""
    d = method_defaults(cfg.init)
    return dataclasses.replace(
        cfg,
        lr=(PRODIGY_LR if cfg.optim == "prodigy" else d["lr"]) if cfg.lr is None else cfg.lr,
        alpha=d["alpha"] if cfg.alpha is None else cfg.alpha,
        gamma=d["gamma"] if cfg.gamma is None else cfg.gamma,
    )


# ---------------------------------------------------------------------------------------------
# parsing
# ---------------------------------------------------------------------------------------------
class _Parser(HfArgumentParser):
    """HfArgumentParser whose errors are QloraGaError one-liners instead of usage + SystemExit(2)."""

    source = "command line"

    def error(self, message: str):  # argparse calls this for every parse error
        message = " ".join(str(message).split())
        if self.source != "command line":  # a YAML value: name the key, not the flag
            message = re.sub(r"argument --([\w-]+)(?:/--[\w-]+)*", lambda m: f"key '{m.group(1)}'", message)
        raise QloraGaError(f"{self.source}: {message}: run with --help to list the options and their values")


def make_parser(prog: str | None = None) -> HfArgumentParser:
    """The HfArgumentParser of :class:`FinetuneConfig` (errors raise QloraGaError; no abbreviations)."""
    return _Parser(
        FinetuneConfig,
        prog=prog,
        allow_abbrev=False,
        description="LoRA-GA / LoRA-One fine-tuning of a causal LM on a 4-bit base (qlora-ga finetune; the other "
                    "commands: qlora-ga export --help, qlora-ga evaluate --help).",
    )


def _parse(parser: _Parser, args: list[str], source: str) -> FinetuneConfig:
    parser.source = source
    try:
        cfg, remaining = parser.parse_args_into_dataclasses(args=args, return_remaining_strings=True, look_for_args_file=False)
    finally:
        parser.source = "command line"
    if remaining:
        flags = [a for a in remaining if a.startswith("-")]
        hint = did_you_mean(flags[0].lstrip("-").replace("-", "_"), FIELD_NAMES) if flags else ""
        raise QloraGaError(
            f"{source}: unknown option(s) {' '.join(remaining)}{hint}: run with --help to list the options"
        )
    return cfg


def _yaml_value_to_arg(name: str, value: Any, path: str) -> str:
    """Render one YAML value as the string the CLI flag would take (argparse then converts it)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, (int, str)):
        return str(value)
    if name == "target_modules" and isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return ",".join(value)
    raise QloraGaError(f"config {path}: key '{name}' has a {type(value).__name__} value {value!r}: give a single value")


def load_yaml(path: str | os.PathLike) -> dict[str, Any]:
    """Read a config YAML into ``{field name: value}`` (dashes in keys become underscores).

    Unknown keys, a nested ``config`` key and non-mapping files raise QloraGaError.
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise QloraGaError(f"config file '{path}' does not exist: check the path given to --config")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        loc = f" at line {where.line + 1}" if where is not None else ""
        raise QloraGaError(f"config {path}: not valid YAML{loc}: fix the syntax (one 'key: value' per line)") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise QloraGaError(f"config {path}: expected a mapping of 'key: value' lines, got a {type(data).__name__}")
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = str(key).strip().replace("-", "_")
        if name == "config":
            raise QloraGaError(f"config {path}: key 'config' cannot be used inside a config file: remove it")
        if name not in FIELD_NAMES:
            raise QloraGaError(
                f"config {path}: unknown key '{key}'{did_you_mean(name, FIELD_NAMES)}: run with --help to list the options"
            )
        if name in out:
            raise QloraGaError(f"config {path}: key '{key}' is given twice: keep one")
        out[name] = value
    return out


def _yaml_to_args(values: dict[str, Any], path: str) -> list[str]:
    defaults = {f.name: f.default for f in dataclasses.fields(FinetuneConfig)}
    args: list[str] = []
    for name, value in values.items():
        if value is None:
            if defaults[name] is not None:
                raise QloraGaError(f"config {path}: key '{name}' is empty: give a value or remove the line")
            continue  # None is the default of every optional field
        args.append(f"--{name}={_yaml_value_to_arg(name, value, path)}")
    return args


def parse_config(argv: list[str] | None = None) -> FinetuneConfig:
    """Parse ``argv`` (default: ``sys.argv[1:]``) into a validated :class:`FinetuneConfig`.

    With ``--config FILE.yaml`` the file's values are the base and the other flags override them.
    ``lr``/``alpha``/``gamma`` stay None when not given: use :func:`resolved` for the numbers.
    """
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = make_parser()
    cfg = _parse(parser, argv, "command line")  # checks the flags, finds --config
    if cfg.config is not None:
        values = load_yaml(cfg.config)
        yaml_args = _yaml_to_args(values, cfg.config)
        _parse(parser, yaml_args, f"config {cfg.config}")  # attribute type errors to the file
        cfg = _parse(parser, yaml_args + argv, "command line")
    return cfg.validate()


# ---------------------------------------------------------------------------------------------
# saving
# ---------------------------------------------------------------------------------------------
def to_dict(cfg: FinetuneConfig) -> dict[str, Any]:
    """All fields except ``config`` (the path of the file the settings were read from)."""
    return {k: v for k, v in dataclasses.asdict(cfg).items() if k != "config"}


def save_yaml(cfg: FinetuneConfig, path: str | os.PathLike) -> Path:
    """Write every setting (except ``config``) to ``path`` atomically; ``--config path`` reads it back."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "# qlora-ga run settings (re-run with: scripts/finetune.py --config this-file)\n"
    text += yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=False, allow_unicode=True)
    atomic_write(path, text)
    return path


__all__ = [
    "FinetuneConfig",
    "METHOD_DEFAULTS",
    "METHODS",
    "OPTIMS",
    "FORMATS",
    "OVERLONG",
    "MERGED_DTYPES",
    "COMPUTE_DTYPES",
    "GGUF_TYPES",
    "REPORT_TO",
    "make_parser",
    "parse_config",
    "load_yaml",
    "method_defaults",
    "resolved",
    "save_yaml",
    "to_dict",
]
