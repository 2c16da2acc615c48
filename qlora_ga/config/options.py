"""Every option of the ``qlora-ga finetune`` command, declared once: :class:`FinetuneConfig` (the field name is the
flag and the YAML key, its metadata the help), and the steps' own settings derived from it (:func:`step_settings`,
:func:`settings_for`). Deliberately light (no torch import): the command checks its arguments before anything
heavy loads.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import Any

from ..constants import DEFAULT_TARGETS, FORMATS, OVERLONG
from ..errors import QloraGaError, did_you_mean
from ..methods import AUTO_LR_DEFAULT, GRADIENT_METHODS, METHODS, default_lrs_text, fixed_lrs_text, method_defaults

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


#: the options each step's own settings take (``steps=`` of :func:`_f`): their Field objects, in declaration order
_STEP_FIELDS: dict[str, list] = {"data": [], "train": []}


def _f(default, help: str, steps: tuple[str, ...] = (), **extra):
    """A dataclass field with argparse metadata (``help`` plus e.g. ``choices``); ``steps``: the steps whose settings
    (:func:`step_settings`: ``DataConfig``, ``TrainSettings``) take it too, under the same name and default."""
    f = field(default=default, metadata={"help": help, **extra})
    for step in steps:
        _STEP_FIELDS[step].append(f)
    return f


@dataclass
class FinetuneConfig:
    """Every option of ``scripts/finetune.py``; the field name is the flag (``--init_samples`` or
    ``--init-samples``) and the YAML key."""

    # --- model and data ---
    model: str | None = _f(None, "hub id, local model folder or .gguf file; default: the built-in SmolLM2-135M-Instruct GGUF")
    dataset: str | None = _f(
        None, "hub dataset id, or a local .json/.jsonl/.csv/.parquet file or folder; default: the built-in arithmetic word problems",
        steps=("data",),
    )
    format: str = _f("auto", "how examples are turned into prompt/response text", choices=FORMATS, steps=("data",))
    prompt_column: str | None = _f(None, "column holding the prompt (prompt-response format); default: guessed", steps=("data",))
    response_column: str | None = _f(None, "column holding the response (prompt-response format); default: guessed", steps=("data",))
    messages_column: str | None = _f(None, "column holding chat messages (messages format); default: 'messages'", steps=("data",))
    text_column: str | None = _f(None, "column holding plain text (text format); default: 'text'", steps=("data",))
    max_length: int = _f(512, "maximum tokens per example (prompt + response)", steps=("data", "train"))
    overlong: str = _f("truncate", "what to do with examples longer than --max_length", choices=OVERLONG, steps=("data",))
    n_builtin: int = _f(400, "number of examples of the built-in arithmetic dataset", steps=("data",))
    eval_split: str | None = _f(
        None, "held-out data: a fraction of the training data ('0.05') or a dataset split name ('test'); default: none",
        steps=("data",),
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
    batch_size: int = _f(4, "sequences per micro-batch during training", steps=("train",))
    grad_accum: int = _f(4, "gradient accumulation steps (effective batch = batch_size * grad_accum)", steps=("train",))
    lr: str | None = _f(None, f"peak learning rate, or 'auto': set from a line search along Adam's first step after the "
                            f"init (qlora_ga/train/autolr.py; costs a few training steps); default: method default "
                            f"({default_lrs_text()}); an 'auto' default is the init's fixed lr "
                            f"({fixed_lrs_text(AUTO_LR_DEFAULT)}) with --optim "
                            f"lora-one-precond; with --optim prodigy {PRODIGY_LR:g} (a multiplier of its own step size)", steps=("train",))
    epochs: float = _f(1.0, "training epochs (used when --max_steps is -1)", steps=("train",))
    max_steps: int = _f(-1, "optimizer steps; -1: use --epochs; 0: initialise the adapters and save, no training", steps=("train",))
    warmup: float = _f(0.03, "linear warmup: a fraction of the steps if < 1, else a number of steps", steps=("train",))
    weight_decay: float = _f(0.0, "AdamW weight decay", steps=("train",))
    max_grad_norm: float = _f(1.0, "gradient-norm clipping threshold (0: no clipping)", steps=("train",))
    optim: str = _f("paged_adamw_32bit", "optimizer ('prodigy': learning-rate-free Adam, the prodigyopt package)", choices=OPTIMS, steps=("train",))
    seed: int = _f(0, "random seed", steps=("data", "train"))
    no_gradient_checkpointing: bool = _f(False, "disable gradient checkpointing (faster, more memory)")
    group_by_length: bool = _f(False, "batch sequences of similar length together (less padding; the order stays seeded and resumable)", steps=("train",))
    padding_free: bool = _f(True, "flatten each micro-batch into one row without padding (position_ids restart per sequence; "
                                  "same sequences, same loss), in training and the gradient pass, where the model's attention "
                                  "supports it (checked per model; padded otherwise, the run says why); false: always pad", steps=("train",))
    packing: bool = _f(False, "pack whole sequences into rows of --max_length tokens (best-fit decreasing over a shuffled "
                              "window; none split, attention within each); --batch_size then counts rows, so a step is a "
                              "token budget of batch_size * grad_accum * max_length; refused for a model without that support", steps=("train",))
    compile: bool = _f(False, "torch.compile each decoder block for training (compiled once per block shape on the first "
                              "step; graph breaks and compile time reported; falls back to eager where it cannot compile)", steps=("train",))
    fused_lora: bool = _f(False, "each 4-bit LoRA linear (with its residual) as one autograd op with a hand-derived backward "
                                 "(the same forward bits; gradients within rounding of PEFT's); PEFT's forward where it does not apply", steps=("train",))
    liger: bool = _f(False, "CUDA only: Liger Kernel's fused Triton kernels (RMSNorm, RoPE, SwiGLU, fused linear cross-entropy); needs pip install 'qlora-ga[liger]'")
    device: str | None = _f(None, "device ('cuda', 'cuda:1', 'cpu'); default: the current GPU, else CPU")
    compute_dtype: str = _f(
        "auto", "dtype of the 4-bit layers' compute and of the rest of the model; auto: bf16 on Ampere and newer "
        "GPUs, fp16 on older ones (T4, V100; with loss scaling), fp32 on CPU", choices=COMPUTE_DTYPES,
    )

    # --- evaluation, logging, checkpoints, export ---
    eval_every: int = _f(0, "evaluate every N optimizer steps (0: only at the end)", steps=("train",))
    save_every: int = _f(0, "save a checkpoint every N optimizer steps (0: only at the end)", steps=("train",))
    save_total_limit: int | None = _f(None, "keep only the newest N checkpoints (older ones are deleted once a newer one is saved); default: all", steps=("train",))
    log_every: int = _f(1, "log metrics every N optimizer steps", steps=("train",))
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
        eval_split = self.eval_fraction if self.eval_fraction is not None else self.eval_split_name
        return settings_for(self, DataConfig, eval_split=eval_split)

    def train_settings(self):
        """The :class:`~qlora_ga.train.TrainSettings` of this run (see :func:`settings_for`); ``lr`` as given, so
        call it on :func:`resolved` settings."""
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


def step_settings(name: str, step: str, doc: str, own: list[tuple] = ()) -> type:
    """A step's settings dataclass: every option of :class:`FinetuneConfig` tagged with ``step`` (its name, type,
    default and help), in the order declared there, then ``own`` (``(name, type, field)`` tuples: the step's settings
    that are no option of the command, or an option's derived form under its own name, which then replaces it).

    This is what makes an option one edit: declared once in :class:`FinetuneConfig` with ``steps=``, it is a CLI
    flag, a YAML key, a line of ``--help`` and a field of each step that reads it."""
    replaced = {spec[0]: spec for spec in own}
    specs = [replaced.pop(f.name, None) or (f.name, f.type, field(default=f.default, metadata=f.metadata))
             for f in dataclasses.fields(FinetuneConfig) if any(f is g for g in _STEP_FIELDS[step])]
    cls = dataclasses.make_dataclass(name, specs + list(replaced.values()), kw_only=True)  # (by name only: the order is
    # FinetuneConfig's, not a signature to rely on)
    cls.__module__, cls.__doc__ = __name__, doc  # (pickled by name, e.g. into DataLoader workers)
    return cls


def settings_for(cfg: FinetuneConfig, cls, **derived):
    """An instance of the dataclass ``cls`` (a step's own settings, e.g. ``DataConfig``, ``TrainSettings``) with every
    field that ``FinetuneConfig`` has under the same name taken from ``cfg``, and ``derived`` for the others.

    The one mapping from the run's settings to the steps': the steps' fields are the options themselves
    (:func:`step_settings`), and nothing copies one by hand.
    """
    shared = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cls) if f.name in FIELD_NAMES and f.name not in derived}
    return cls(**shared, **derived)


def resolved(cfg: FinetuneConfig) -> FinetuneConfig:
    """A copy of ``cfg`` with ``lr``, ``alpha`` and ``gamma`` left at None filled from :func:`method_defaults` (the lr of
    an init in :data:`AUTO_LR_DEFAULT` is ``"auto"`` with the optimizers the search follows)."""
    d = method_defaults(cfg.init)
    lr = cfg.lr
    if lr is None:
        auto = cfg.init in AUTO_LR_DEFAULT and cfg.optim in AUTO_LR_OPTIMS
        lr = PRODIGY_LR if cfg.optim == "prodigy" else AUTO_LR if auto else d["lr"]
    return dataclasses.replace(
        cfg,
        lr=lr,
        alpha=d["alpha"] if cfg.alpha is None else cfg.alpha,
        gamma=d["gamma"] if cfg.gamma is None else cfg.gamma,
    )


# ---- the steps' own settings (filled by settings_for) ----

#: the training step's settings: the options declared with ``steps=("train", ...)``, plus the step's own fields below
TrainSettings = step_settings("TrainSettings", "train", """The training step's settings (see
:func:`step_settings`): the run's options tagged ``train`` and the loop's own fields.""", own=[
    ("lr", "float", field(default=5e-5)),  # the peak lr as a number ('auto' and the method default are resolved before)
    ("gradient_checkpointing", "bool", field(default=True)),  # from --no_gradient_checkpointing
    ("precond_lambda", "float", field(default=1e-6)),  # --optim lora-one-precond's damping
    ("num_workers", "int | None", field(default=None)),  # DataLoader workers; None: 2 on CUDA, 0 (main process) elsewhere
])

#: where the examples come from and how they become token ids: the options declared with ``steps=("data", ...)``,
#: plus the step's own fields below
DataConfig = step_settings("DataConfig", "data", """Where the examples come from and how they are turned into token ids.

    ``dataset``: None -> the built-in arithmetic set (``make_arithmetic_examples(n_builtin, seed=0)``);
    a local .json/.jsonl/.csv/.parquet file or a folder of such files; or a hub id (``"id"`` or
    ``"id:config"``, e.g. ``"openai/gsm8k:main"``) loaded with ``datasets.load_dataset(id, split=split)``.
    ``eval_split``: a fraction 0<f<1 (float or string like "0.05") of the examples held out by
    ``seed``, or a split name of the same dataset (for a local file: the sibling file of that name,
    e.g. ``train.jsonl`` -> ``test.jsonl``, or a path to a file). ``max_examples`` keeps the first N
    records of the training split (file order, before shuffling and hold-out).""", own=[
    ("eval_split", "float | str | None", field(default=None)),  # the option's fraction as a number, or a split name
    ("split", "str", field(default="train")),
    ("max_examples", "int | None", field(default=None)),
    ("use_chat_template", "bool | None", field(default=None)),
])
