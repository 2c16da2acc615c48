"""Data, the whole step: load -> format -> tokenize -> cut to ``max_length`` -> shuffle by seed -> train / eval.

:func:`build_data` is what training calls; :class:`DataStats` counts what was read, dropped and cut.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from ..constants import IGNORE_INDEX
from ..errors import QloraGaError
from .config import DataConfig, _error, _eval_fraction
from .formats import _columns, _resolve_format
from .load import load_records
from .tokenize import _fit, tokenize_example


@dataclass
class DataStats:
    """Counts over every record read (training split plus a named eval split, if any).

    ``n_raw``: records read (after ``max_examples``); ``n_empty_dropped``: empty/whitespace/missing
    response or text; ``n_truncated``: kept after cutting to ``max_length``; ``n_overlong_dropped``:
    longer than ``max_length`` with ``overlong="drop"``, or left without label tokens by the cut;
    ``n_train``/``n_eval``: final sizes; ``n_label_tokens``: label tokens (!= -100) in ``train``.
    """

    n_raw: int = 0
    n_empty_dropped: int = 0
    n_truncated: int = 0
    n_overlong_dropped: int = 0
    n_train: int = 0
    n_eval: int = 0
    n_label_tokens: int = 0


@dataclass
class TokenizedData:
    """``train``/``eval``: lists of ``{"input_ids": list[int], "labels": list[int]}`` (-100 on prompt
    tokens). ``eval_records[i]`` is the raw record of ``eval[i]`` (for generation-based evaluation
    with :func:`prompt_text`); ``format`` is the resolved format."""

    train: list[dict]
    eval: list[dict]
    stats: DataStats
    eval_records: list[dict] = field(default_factory=list)
    format: str = ""


def _process(records: list[dict], tokenizer, cfg: DataConfig, fmt: str, stats: DataStats):
    """Tokenized examples and their records, with the counts added to ``stats``; also the local counts."""
    examples, kept = [], []
    n_empty = n_over = 0
    for rec in records:
        ex = tokenize_example(rec, tokenizer, cfg, fmt)
        if ex is None:
            n_empty += 1
            continue
        ex, status = _fit(ex, cfg)
        if ex is None:
            n_over += 1
            continue
        stats.n_truncated += status == "truncated"
        examples.append(ex)
        kept.append(rec)
    stats.n_raw += len(records)
    stats.n_empty_dropped += n_empty
    stats.n_overlong_dropped += n_over
    return examples, kept, n_empty, n_over


def _nothing_left(what: str, n: int, n_empty: int, n_over: int, cfg: DataConfig) -> QloraGaError:
    if n_over and n_over + n_empty == n:
        if cfg.overlong == "drop":
            return _error(f"every {what} example is longer than --max-length {cfg.max_length} tokens "
                          f"({n_over} dropped, {n_empty} empty): raise --max-length or use --overlong truncate")
        return _error(f"every {what} example's prompt fills --max-length {cfg.max_length} tokens, leaving no "
                      f"response tokens to learn ({n_over} dropped, {n_empty} empty): raise --max-length")
    return _error(f"no {what} examples left: all {n} records are empty (no response/text); check the "
                  "--format and the --prompt-column/--response-column/--text-column options")


@dataclass
class Records:
    """The raw records of a run (training split, named eval split or None) and their resolved format."""

    train: list[dict]
    eval: list[dict] | None
    format: str


def load_checked_records(cfg: DataConfig) -> Records:
    """Read the dataset and check its format and columns, without a tokenizer: called before the model loads,
    so a wrong path, format or column is found in seconds, not after minutes of loading."""
    train_records, eval_records = load_records(cfg)
    columns = list(dict.fromkeys(k for r in train_records[:100] for k in r))
    fmt = _resolve_format(cfg, columns)
    _columns(cfg, fmt, columns)  # fail early with the columns found
    return Records(train_records, eval_records, fmt)


def build_data(tokenizer, cfg: DataConfig, records: Records | None = None) -> TokenizedData:
    """Load (or take ``records``, from :func:`load_checked_records`), format, tokenize (prompt-masked), cut to
    ``max_length``, shuffle by ``seed`` and split."""
    records = records if records is not None else load_checked_records(cfg)
    train_records, eval_records, fmt = records.train, records.eval, records.format
    stats = DataStats()
    examples, records, n_empty, n_over = _process(train_records, tokenizer, cfg, fmt, stats)
    if not examples:
        raise _nothing_left("training", len(train_records), n_empty, n_over, cfg)
    order = list(range(len(examples)))
    random.Random(cfg.seed).shuffle(order)
    eval_examples: list[dict] = []
    eval_kept: list[dict] = []
    frac = _eval_fraction(cfg)
    if frac is not None:
        n_eval = max(1, round(frac * len(order)))
        if n_eval >= len(order):
            raise _error(f"eval_split {cfg.eval_split} leaves no training examples out of {len(order)}: "
                         "use a smaller fraction or more data")
        eval_examples = [examples[i] for i in order[:n_eval]]
        eval_kept = [records[i] for i in order[:n_eval]]
        order = order[n_eval:]
    elif eval_records is not None:
        eval_examples, eval_kept, e_empty, e_over = _process(eval_records, tokenizer, cfg, fmt, stats)
        if not eval_examples:
            raise _nothing_left(f"eval ({cfg.eval_split})", len(eval_records), e_empty, e_over, cfg)
    train = [examples[i] for i in order]
    stats.n_train = len(train)
    stats.n_eval = len(eval_examples)
    stats.n_label_tokens = sum(sum(1 for t in ex["labels"] if t != IGNORE_INDEX) for ex in train)
    return TokenizedData(train=train, eval=eval_examples, stats=stats, eval_records=eval_kept, format=fmt)
