"""Data settings: :class:`DataConfig` (where the examples come from and how they become token ids; declared with
the run's options in :mod:`qlora_ga.config`), its checks, and the one-line errors every data step raises."""

from __future__ import annotations

from ..config import DataConfig
from ..constants import FORMATS, OVERLONG
from ..errors import QloraGaError


def _one_line(msg: str) -> str:
    return " ".join(str(msg).split("\n")).strip()


def _error(msg: str) -> QloraGaError:
    return QloraGaError(_one_line(msg))


def _cause_line(exc: BaseException) -> str:
    """The most specific first line in an exception chain (datasets wraps the pyarrow/json error)."""
    chain, seen = [], set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        chain.append(e)
        e = e.__cause__ or e.__context__
    for e in reversed(chain):
        text = str(e).strip()
        if text:
            return f"{type(e).__name__}: {text.splitlines()[0].strip()}"
    return type(exc).__name__


def _eval_fraction(cfg: DataConfig) -> float | None:
    """The hold-out fraction if ``eval_split`` is a number, else None; raises on a bad number."""
    v = cfg.eval_split
    if v is None or isinstance(v, bool):
        return None
    if isinstance(v, (int, float)):
        f = float(v)
    else:
        try:
            f = float(str(v).strip())
        except ValueError:
            return None
    if not 0.0 < f < 1.0:
        raise _error(f"eval_split {v!r} is a number outside (0, 1): pass a fraction like 0.05 or a split name like test")
    return f


def _eval_split_name(cfg: DataConfig) -> str | None:
    v = cfg.eval_split
    if v is None or isinstance(v, (int, float)) or _eval_fraction(cfg) is not None:
        return None
    name = str(v).strip()
    if not name:
        raise _error("eval_split is an empty string: pass a fraction like 0.05, a split name like test, or leave it unset")
    return name


def _check_config(cfg: DataConfig) -> None:
    if cfg.format not in FORMATS:
        raise _error(f"unknown data format {cfg.format!r}: use --format with one of {', '.join(FORMATS)}")
    if cfg.overlong not in OVERLONG:
        raise _error(f"unknown overlong policy {cfg.overlong!r}: use --overlong truncate or --overlong drop")
    if not isinstance(cfg.max_length, int) or cfg.max_length < 2:
        raise _error(f"max_length must be an integer >= 2, got {cfg.max_length!r}: pass e.g. --max-length 512")
    if cfg.max_examples is not None and cfg.max_examples < 1:
        raise _error(f"max_examples must be >= 1, got {cfg.max_examples}: pass a positive number or leave it unset")
    if cfg.dataset is None and cfg.n_builtin < 1:
        raise _error(f"n_builtin must be >= 1, got {cfg.n_builtin}: pass e.g. --n-builtin 400")
    _eval_fraction(cfg)
