"""Data, step 1: the raw records (lists of dicts), before any formatting.

From the built-in set, a local .json/.jsonl/.csv/.parquet file or folder (read with ``datasets``' file
builders in a throw-away cache), or a hub dataset ``id[:config]``; plus the records of a named eval
split (a sibling file, a file path, or the hub split). A fractional hold-out is taken later, after
tokenizing (:func:`~qlora_ga.data.build.build_data`).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from ..errors import QloraGaError
from .builtin import make_arithmetic_examples
from .config import DataConfig, _cause_line, _check_config, _error, _eval_split_name


FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


def _local_path(name: str) -> Path | None:
    """The path if ``name`` names a local file/folder (existing or clearly meant as one), else None."""
    p = Path(name).expanduser()
    if p.exists():
        return p
    if p.suffix.lower() in FILE_BUILDERS or name.startswith(("/", "./", "../", "~", ".\\")) or name.endswith(("/", "\\")):
        return p
    return None


def _load_file(path: Path, what: str = "dataset file") -> list[dict]:
    import datasets

    if not path.exists():
        raise _error(f"{what} not found: {path}; check the path (or pass a hub dataset id)")
    if path.is_dir():
        return _load_dataset_call(str(path), None, "train", what=f"dataset folder {path}")
    builder = FILE_BUILDERS.get(path.suffix.lower())
    if builder is None:
        raise _error(f"unsupported {what} type {path.suffix or '(no extension)'!r} for {path}: "
                     f"use a .json, .jsonl, .csv or .parquet file")
    try:
        if path.stat().st_size == 0 or (builder != "parquet" and not path.read_bytes().strip()):
            raise _error(f"{what} {path} is empty (0 records): put one example per line/row in it")
    except OSError as e:
        raise _error(f"cannot read {what} {path}: {_cause_line(e)}") from None
    try:
        with tempfile.TemporaryDirectory(prefix="qlora_ga_data_") as cache:
            ds = datasets.load_dataset(builder, data_files=str(path), split="train", cache_dir=cache)
            records = ds.to_list()
    except QloraGaError:
        raise
    except Exception as e:  # noqa: BLE001 - datasets/pyarrow/json raise many kinds
        line = _cause_line(e)
        if isinstance(e, StopIteration) or "corresponds to no data" in line or "No columns to parse" in line:
            raise _error(f"{what} {path} is empty (0 records): put one example per line/row in it") from None
        hint = {"json": "valid JSON (a list of objects) or JSON Lines (one object per line)",
                "csv": "a CSV file with a header row", "parquet": "a Parquet file"}[builder]
        raise _error(f"could not parse {what} {path} ({line}): check that it is {hint}") from None
    if not records:
        raise _error(f"{what} {path} is empty (0 records): put one example per line/row in it")
    return records


def _load_dataset_call(name: str, config: str | None, split: str, what: str) -> list[dict]:
    import datasets

    try:
        ds = datasets.load_dataset(name, config, split=split)
    except Exception as e:  # noqa: BLE001
        offline = " (offline mode is on: use a dataset already in the cache or a local file)" if (
            os.environ.get("HF_DATASETS_OFFLINE") == "1" or os.environ.get("HF_HUB_OFFLINE") == "1") else ""
        raise _error(f"could not load {what} split {split!r} ({_cause_line(e)}): check the id, the split name "
                     f"and the config (write 'id:config'){offline}") from None
    records = ds.to_list()
    if not records:
        raise _error(f"{what} split {split!r} is empty (0 records): pick another split or dataset")
    return records


def _split_hub_id(name: str) -> tuple[str, str | None]:
    if ":" in name and "://" not in name:
        repo, config = name.rsplit(":", 1)
        return repo, (config or None)
    return name, None


def load_records(cfg: DataConfig) -> tuple[list[dict], list[dict] | None]:
    """Raw training records (first ``max_examples`` if set) and the raw records of the eval split
    when ``eval_split`` is a split name (None otherwise)."""
    _check_config(cfg)
    split_name = _eval_split_name(cfg)
    eval_records = None
    if cfg.dataset is None:
        if split_name is not None:
            raise _error(f"the built-in dataset has no split {split_name!r}: pass a fraction such as --eval-split 0.1")
        train = make_arithmetic_examples(cfg.n_builtin, seed=0)
    elif (path := _local_path(cfg.dataset)) is not None:
        train = _load_file(path)
        if split_name is not None:
            if path.is_dir():
                eval_records = _load_dataset_call(str(path), None, split_name, what=f"dataset folder {path}")
            else:
                as_path = Path(split_name).expanduser()
                sibling = path.with_name(split_name + path.suffix)
                if as_path.suffix.lower() in FILE_BUILDERS and as_path.exists():
                    eval_records = _load_file(as_path, what="eval file")
                elif sibling.exists():
                    eval_records = _load_file(sibling, what="eval file")
                else:
                    raise _error(f"eval split {split_name!r}: no file {sibling} next to {path}; pass a fraction "
                                 f"(--eval-split 0.1) or the path of an eval file")
    else:
        repo, config = _split_hub_id(cfg.dataset)
        train = _load_dataset_call(repo, config, cfg.split, what=f"dataset {cfg.dataset!r}")
        if split_name is not None:
            eval_records = _load_dataset_call(repo, config, split_name, what=f"dataset {cfg.dataset!r}")
    if cfg.max_examples is not None:
        train = train[: cfg.max_examples]
    return train, eval_records
