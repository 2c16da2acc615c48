"""Evaluation: held-out loss and GSM8K-style exact match.

* **Loss**: token-weighted mean cross-entropy over the answer tokens of every example (the prompt
  is masked), so it does not depend on the batch size or padding. An example is
  ``prompt + answer + eos`` where the prompt is the tokenizer's chat template applied to one user
  message (the question) with ``add_generation_prompt=True``, or ``question + "\\n"`` when the
  tokenizer has no chat template.
* **Exact match**: greedy decoding (``model.generate``, batched, LEFT padding) from the same
  prompt; the predicted answer is the number after the first ``####`` of the generated text if
  there is one, else the last number of the text (:func:`extract_answer`; commas and ``$`` are
  stripped); the gold answer is the number after ``####`` in the reference. They are compared as
  numbers (``"3.50" == "3.5"``).

``main`` is the command line of ``scripts/evaluate.py``; it writes a JSON report with ``n``,
``exact_match`` (count), ``exact_match_rate``, ``loss`` and per-example predictions.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import re
import sys
from decimal import Decimal, InvalidOperation
from pathlib import Path

import torch

from . import distributed
from .data.batch import collate, count_label_tokens
from .data.config import DataConfig
from .data.tokenize import prompt_ids as data_prompt_ids
from .data.tokenize import tokenize_example
from .errors import QloraGaError, system_error_line
from .fileio import atomic_write
from .log import quiet_libraries
from .model import autocast

log = logging.getLogger(__name__)

_NUMBER = re.compile(r"(?P<sign>-)?\$?(?P<num>\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?|\.\d+)")


# ----------------------------------------------------------------------------- answers


def _numbers(text: str) -> list[str]:
    out = []
    for m in _NUMBER.finditer(text):
        num = m.group("num").replace(",", "")
        neg = False
        if m.group("sign"):
            prev = text[m.start() - 1] if m.start() > 0 else " "
            neg = not (prev.isalnum() or prev in ")]}")  # "10-3" is a subtraction, not -3
        try:
            d = Decimal(num)
        except InvalidOperation:  # pragma: no cover - the regex only admits valid numbers
            continue
        d = -d if neg else d
        out.append(str(int(d)) if d == d.to_integral_value() else format(d.normalize(), "f"))
    return out


def extract_answer(text: str | None) -> str | None:
    """The numeric answer in ``text``: the first number after ``####`` if any, else the last number.

    Commas (thousands separators) and ``$`` are dropped and the number is normalised
    (``"$1,234.50"`` -> ``"1234.5"``, ``"3.0"`` -> ``"3"``). ``None`` when there is no number.
    """
    if not text:
        return None
    if "####" in text:
        after = _numbers(text.split("####", 1)[1])
        if after:
            return after[0]
    nums = _numbers(text)
    return nums[-1] if nums else None


def answers_match(pred: str | None, gold: str | None) -> bool:
    """Numeric equality of two extracted answers (``None`` never matches)."""
    if pred is None or gold is None:
        return False
    try:
        return Decimal(pred) == Decimal(gold)
    except InvalidOperation:
        return pred.strip() == gold.strip()


# ----------------------------------------------------------------------------- data


def load_examples(path, max_examples: int | None = None) -> list[dict]:
    """``[{"question": ..., "answer": ...}, ...]`` from a JSONL file (GSM8K format)."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise QloraGaError(f"data file '{p}' does not exist: pass a .jsonl file with question/answer records")
    examples = []
    with p.open() as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise QloraGaError(f"{p}:{lineno} is not valid JSON ({e.msg}): the file must hold one JSON object per line") from None
            if not isinstance(rec, dict) or not isinstance(rec.get("question"), str) or not isinstance(rec.get("answer"), str):
                raise QloraGaError(f"{p}:{lineno} needs string fields 'question' and 'answer'")
            examples.append({"question": rec["question"], "answer": rec["answer"]})
            if max_examples is not None and len(examples) >= max_examples:
                break
    if not examples:
        raise QloraGaError(f"data file '{p}' has no examples")
    return examples


# GSM8K records as training sees them (qlora_ga.data): the question is the prompt, the worked answer the response
GSM8K_FORMAT = DataConfig(format="prompt-response", prompt_column="question", response_column="answer")


def prompt_ids(tokenizer, question: str) -> list[int]:
    """Token ids of the prompt exactly as at training time (chat template when the tokenizer has one)."""
    return data_prompt_ids({"question": question, "answer": ""}, tokenizer, GSM8K_FORMAT, "prompt-response")


def _device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:  # pragma: no cover
        return torch.device("cpu")


def _pad_id(tokenizer) -> int:
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if tid is not None:
            return tid
    return 0  # pragma: no cover


# ----------------------------------------------------------------------------- loss


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
        with autocast(device, dtype):
            loss = model(**model_inputs({key: v.to(device) for key, v in b.items()})).loss
        total = total + loss.double() * k
        n += k
    model.train(was)
    total, n = distributed.sum_tensor(torch.stack([total, torch.tensor(float(n), dtype=torch.float64, device=device)])).tolist()
    return total / max(n, 1)


def held_out_loss(model, tokenizer, examples, *, batch_size: int = 8, max_length: int = 1024) -> tuple[float, int]:
    """``(token-weighted mean loss over answer tokens, number of answer tokens)``; examples tokenized as in training."""
    seqs = []
    for ex in examples:
        t = tokenize_example(ex, tokenizer, GSM8K_FORMAT, "prompt-response")
        if t is not None:
            seqs.append({k: v[:max_length] for k, v in t.items()})
    count = count_label_tokens(collate(seqs, _pad_id(tokenizer))["labels"]) if seqs else 0
    if count == 0:
        return float("nan"), 0
    return evaluate_loss(model, seqs, batch_size, _pad_id(tokenizer), _device(model), torch.float32), count


# ----------------------------------------------------------------------------- generation


@torch.no_grad()
def generate_texts(model, tokenizer, prompts: list[list[int]], *, max_new_tokens: int = 256, batch_size: int = 8,
                   progress: bool = True) -> list[str]:
    """Greedy continuations of ``prompts`` (token id lists), batched with left padding; decoded text only."""
    from tqdm.auto import tqdm

    device = _device(model)
    pad = _pad_id(tokenizer)
    eos = [t for t in {tokenizer.eos_token_id, *_as_list(getattr(getattr(model, "generation_config", None), "eos_token_id", None))}
           if t is not None]
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    out: list[str | None] = [None] * len(prompts)
    bar = tqdm(total=len(prompts), desc="generating", unit="ex", disable=not progress)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        width = max(len(prompts[i]) for i in idx)
        ids = torch.full((len(idx), width), pad, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for j, i in enumerate(idx):  # LEFT padding: every prompt ends at the last column
            p = prompts[i]
            ids[j, width - len(p):] = torch.tensor(p)
            mask[j, width - len(p):] = 1
        gen = model.generate(
            input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
            do_sample=False, num_beams=1, pad_token_id=pad, eos_token_id=eos or None, use_cache=True,
        )
        for j, i in enumerate(idx):
            out[i] = tokenizer.decode(gen[j, width:], skip_special_tokens=True)
        bar.update(len(idx))
    bar.close()
    return [o or "" for o in out]


def _as_list(x):
    if x is None:
        return []
    return list(x) if isinstance(x, (list, tuple)) else [x]


# ----------------------------------------------------------------------------- evaluation


def evaluate(model, tokenizer, examples: list[dict], *, max_new_tokens: int = 256, batch_size: int = 8,
             max_length: int = 1024, compute_loss: bool = True, generate: bool = True, progress: bool = True) -> dict:
    """Held-out loss and exact match of ``model`` on ``examples``; returns the report dict.
    ``generate=False`` skips the generations (exact match is then None)."""
    model.eval()
    loss, tokens = (held_out_loss(model, tokenizer, examples, batch_size=batch_size, max_length=max_length)
                    if compute_loss else (None, 0))
    if not generate:
        return {"n": len(examples), "exact_match": None, "exact_match_rate": None, "loss": loss, "loss_tokens": tokens,
                "max_new_tokens": 0, "predictions": []}
    prompts = [prompt_ids(tokenizer, ex["question"]) for ex in examples]
    texts = generate_texts(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
                           progress=progress)
    preds = []
    for i, (ex, text) in enumerate(zip(examples, texts)):
        gold, pred = extract_answer(ex["answer"]), extract_answer(text)
        preds.append({"index": i, "question": ex["question"], "gold": gold, "prediction": pred,
                      "correct": answers_match(pred, gold), "output": text})
    n = len(examples)
    correct = sum(p["correct"] for p in preds)
    return {
        "n": n,
        "exact_match": correct,
        "exact_match_rate": correct / n if n else 0.0,
        "loss": loss,
        "loss_tokens": tokens,
        "max_new_tokens": max_new_tokens,
        "predictions": preds,
    }


# ----------------------------------------------------------------------------- command line


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser(prog: str = "evaluate.py") -> argparse.ArgumentParser:
    p = _Parser(prog=prog, description="Held-out loss and GSM8K-style exact match of a (fine-tuned) model.")
    p.add_argument("--model", default=None,
                   help="base or merged model: folder, hub id or .gguf (default: the SmolLM2-135M GGUF)")
    p.add_argument("--no-quantize", action="store_true", help="load the model as is instead of in 4-bit NF4")
    p.add_argument("--adapter", default=None, help="PEFT adapter folder to put on the model")
    p.add_argument("--data", required=True, help="JSONL file with question/answer records (GSM8K format)")
    p.add_argument("--max-examples", type=int, default=None, help="evaluate the first N examples only")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=1024, help="truncate loss sequences to this many tokens")
    p.add_argument("--no-loss", action="store_true", help="skip the held-out loss")
    p.add_argument("--no-generate", action="store_true", help="skip the generations: held-out loss only (fast)")
    p.add_argument("--out", default=None, help="write the JSON report here")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def _check_positive(args):
    for name in ("max_examples", "max_new_tokens", "batch_size", "max_length"):
        v = getattr(args, name)
        if v is not None and v <= 0:
            raise QloraGaError(f"--{name.replace('_', '-')} must be positive, got {v}")


REPORT_KEYS = {"n", "exact_match", "loss", "predictions"}


def _is_report(path: Path) -> bool:
    """Whether ``path`` holds a report this command wrote (a JSON object with its keys)."""
    try:
        if path.stat().st_size > 1 << 30:
            return False
        rec = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(rec, dict) and REPORT_KEYS <= rec.keys()


def check_report_path(out, data=None) -> Path:
    """Refuse, before the (long) evaluation, an ``--out`` that cannot be written or that holds something else.

    An existing file is replaced only when it is an earlier report of this command (never the data file or
    any other file); the first existing folder on the way must take a new file (probed with a temporary one).
    """
    p = Path(out).expanduser()
    if p.is_dir():
        raise QloraGaError(f"--out '{out}' is a folder: pass a file name, e.g. {p / 'report.json'}")
    if p.exists():
        if data is not None and Path(data).expanduser().exists() and p.samefile(Path(data).expanduser()):
            raise QloraGaError(f"--out '{out}' is the --data file: choose another --out")
        if not _is_report(p):
            raise QloraGaError(f"--out '{out}' exists and is not a report of evaluate.py: choose another --out")
    from .fileio import nearest_folder, probe_write

    folder = nearest_folder(p.absolute().parent)
    if not folder.is_dir():
        raise QloraGaError(f"cannot write the report to '{out}': '{folder}' is a file, not a folder: choose another --out")
    try:
        probe_write(folder)
    except OSError as e:
        raise QloraGaError(f"cannot write the report to '{out}': {e.strerror or e} in '{folder}': choose another --out") from None
    return p


def check_adapter(adapter) -> Path:
    """The adapter folder, its weights file's header read (a truncated or corrupt file is a one-line error)."""
    from safetensors import safe_open

    from .constants import ADAPTER_WEIGHTS
    from .export.adapter import unreadable_as_error

    d = Path(adapter).expanduser()
    if not d.is_dir():
        raise QloraGaError(f"adapter folder '{adapter}' does not exist: pass the folder written by export")
    weights = d / ADAPTER_WEIGHTS
    if weights.is_file():
        with unreadable_as_error(weights), safe_open(str(weights), framework="pt") as f:
            f.keys()
    return d


_SIZE_MISMATCH = re.compile(r"size mismatch for (?:base_model\.model\.)?(?P<name>\S+): copying a param with shape "
                            r"torch\.Size\((?P<adapter>\[[^\]]*\])\) from checkpoint, the shape in current model is "
                            r"torch\.Size\((?P<model>\[[^\]]*\])\)")


def load_adapter(model, adapter, model_name: str | None):
    """``PeftModel.from_pretrained(model, adapter)``; an adapter that does not fit the model is a one-line error."""
    from peft import PeftModel

    d = Path(adapter).expanduser()
    on = f"the model '{model_name}'" if model_name else "the built-in SmolLM2-135M-Instruct (no --model)"
    try:
        return PeftModel.from_pretrained(model, str(d))
    except RuntimeError as e:
        m = _SIZE_MISMATCH.search(str(e))
        if m is None:
            raise
        try:
            trained_on = json.loads((d / "adapter_config.json").read_text()).get("base_model_name_or_path")
        except (OSError, ValueError, AttributeError):
            trained_on = None
        raise QloraGaError(
            f"adapter '{adapter}' does not fit {on}: {m['name']} is {m['adapter']} in the adapter but {m['model']} "
            f"in the model -- the adapter was trained on another base model"
            + (f" ('{trained_on}')" if trained_on else "") + ": pass that one with --model"
        ) from None
    except (ValueError, OSError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise QloraGaError(f"cannot load adapter '{adapter}' on {on}: {first}") from None


def main(argv=None, prog: str = "evaluate.py") -> int:
    args = build_parser(prog).parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    quiet_libraries()
    try:
        _check_positive(args)
        if args.no_loss and args.no_generate:
            raise QloraGaError("--no-loss and --no-generate together leave nothing to evaluate: drop one of them")
        examples = load_examples(args.data, args.max_examples)
        if args.out:
            check_report_path(args.out, args.data)
        if args.adapter:
            check_adapter(args.adapter)
        from .model import load_model

        model, tokenizer = load_model(args.model, quantize=not args.no_quantize)
        if args.adapter:
            model = load_adapter(model, args.adapter, args.model)
        report = evaluate(model, tokenizer, examples, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                          max_length=args.max_length, compute_loss=not args.no_loss, generate=not args.no_generate,
                          progress=not args.quiet)
        report = {"model": args.model, "adapter": args.adapter, "data": str(args.data), "quantized": not args.no_quantize,
                  **report}
        if report["loss"] is not None and not math.isfinite(report["loss"]):
            log.warning("the held-out loss is not finite")
        loss = f"{report['loss']:.4f}" if report["loss"] is not None else "n/a"
        em = "n/a" if report["exact_match"] is None else f"{report['exact_match']} ({report['exact_match_rate']:.1%})"
        result = f"n={report['n']} exact_match={em} loss={loss}"
        if args.out:
            try:
                atomic_write(Path(args.out).expanduser(), json.dumps(report, indent=2) + "\n")
            except OSError as e:
                print(result)  # the numbers are not lost with the file
                raise QloraGaError(f"cannot write the report to '{args.out}': {e.strerror or e}: choose another --out") from None
        print(result + (f" -> {args.out}" if args.out else ""))
    except QloraGaError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (OSError, MemoryError) as e:
        print(system_error_line(e), file=sys.stderr)
        return 2
    return 0
