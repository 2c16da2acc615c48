"""The options from the command line and YAML files (transformers' :class:`~transformers.HfArgumentParser`), and
back to YAML (``run_config.yaml``). Every mistake is one :class:`~qlora_ga.errors.QloraGaError` line."""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path
from typing import Any

import yaml
from transformers import HfArgumentParser

from ..errors import QloraGaError, did_you_mean
from ..fileio import atomic_write
from .options import FIELD_NAMES, FinetuneConfig


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
