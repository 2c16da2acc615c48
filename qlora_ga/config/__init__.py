"""Run settings: one dataclass for every option of ``qlora-ga finetune``, from CLI flags and/or YAML.

``parse_config(argv)`` parses with transformers' :class:`~transformers.HfArgumentParser`. With
``--config FILE.yaml`` the YAML keys (field names; dashes accepted) are the base and the flags given
on the command line override them. Every mistake (unknown key or flag, a value of the wrong type,
a value out of range) is raised as a one-line :class:`~qlora_ga.errors.QloraGaError`, never as
``SystemExit`` (``--help`` still prints the help and exits 0).

``None`` in ``lr``/``alpha``/``gamma`` means "the default of the chosen init method"
(:data:`METHOD_DEFAULTS`); :func:`resolved` fills them in. ``save_yaml`` writes every field (except
``config`` itself) so that ``parse_config(["--config", saved])`` gives the same settings back.

- :mod:`.options`: :class:`FinetuneConfig`, each option declared once, and the steps' settings derived from it
  (:class:`DataConfig`, :class:`TrainSettings`);
- :mod:`.files`: parsing (command line, YAML) and saving.

Deliberately light (no torch import): the command can parse and validate before loading anything heavy.
"""

from ..methods import METHOD_DEFAULTS, METHODS, method_defaults
from .files import load_yaml, make_parser, parse_config, save_yaml, to_dict
from .options import (AUTO_LR, AUTO_LR_OPTIMS, COMPUTE_DTYPES, FIELD_NAMES, FORMATS, GGUF_TYPES, MERGED_DTYPES, OPTIMS,
                      OVERLONG, PRODIGY_LR, RANK_ALLOCATIONS, REPORT_TO, DataConfig, FinetuneConfig, TrainSettings, resolved,
                      settings_for, step_settings)

__all__ = ["AUTO_LR", "AUTO_LR_OPTIMS", "COMPUTE_DTYPES", "DataConfig", "FIELD_NAMES", "FORMATS", "FinetuneConfig", "GGUF_TYPES",
           "MERGED_DTYPES", "METHOD_DEFAULTS", "METHODS", "OPTIMS", "OVERLONG", "PRODIGY_LR", "RANK_ALLOCATIONS",
           "REPORT_TO", "load_yaml", "make_parser", "method_defaults", "parse_config", "resolved", "save_yaml",
           "settings_for", "step_settings", "to_dict", "TrainSettings"]
