"""Step 0: data. Records in, prompt-masked token ids out, then padded micro-batches.

One concept per file, in pipeline order:

- :mod:`.config` -- :class:`DataConfig` (where the examples come from, how they become ids) and its checks;
- :mod:`.builtin` -- the built-in arithmetic demo set (offline, deterministic);
- :mod:`.load` -- raw records from the built-in set, a local file/folder or a hub dataset, and a named eval split;
- :mod:`.formats` -- format detection (alpaca / prompt-response / messages / text) and the columns of each;
- :mod:`.tokenize` -- one record -> ``input_ids``/``labels`` (prompt masked, EOS), the ``max_length`` cut;
- :mod:`.build` -- :func:`build_data`: all of the above, shuffled by seed and split into train / eval;
- :mod:`.batch` -- the gradient-pass sample, :func:`collate` and :func:`count_label_tokens`;
- :mod:`.packing` -- padding-free rows and packing (``position_ids`` restarting per sequence), and which models support them.

The names below are the public API (``from qlora_ga.data import build_data``).
"""

from .batch import collate, count_label_tokens, sample_batch
from .build import DataStats, TokenizedData, build_data
from .builtin import make_arithmetic_examples
from .config import DataConfig
from .formats import MESSAGES_COLUMNS, PROMPT_RESPONSE_PAIRS, TEXT_COLUMNS, detect_format
from .load import FILE_BUILDERS, load_records
from .packing import collate_packed, collate_padding_free, padding_free_support
from .tokenize import prompt_ids, prompt_text, tokenize_example

__all__ = [
    "DataConfig", "DataStats", "TokenizedData", "build_data", "load_records", "make_arithmetic_examples",
    "detect_format", "tokenize_example", "prompt_text", "prompt_ids", "collate", "count_label_tokens", "sample_batch",
    "collate_packed", "collate_padding_free", "padding_free_support",
    "FILE_BUILDERS", "PROMPT_RESPONSE_PAIRS", "MESSAGES_COLUMNS", "TEXT_COLUMNS",
]
