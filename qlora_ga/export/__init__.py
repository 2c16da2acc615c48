"""Step 5 of the pipeline: export a trained adapter (docs/DESIGN.md section 6).

Three forms, one module each:

* ``adapter.py`` -- the adapter in vanilla PEFT format (``save_adapter``, ``export_adapter``), the
  frozen LoRA-GA residual folded into a LoRA of twice the rank, plus ``qlora_ga.json``
  (method metadata); ``load_adapter_dir`` reads such a folder (or a training checkpoint) back.
* ``merge.py`` -- the adapter merged into its 16-bit base (``merge_export``), fp16/bf16/fp32
  sharded safetensors, streamed one tensor at a time; ``merge_base`` chooses the original ``W``
  or ``deQ(Q(W))``. ``base.py`` finds and reads the base checkpoint.
* ``gguf.py`` -- a GGUF for llama.cpp / Ollama (the merge, then llama.cpp's own converter and
  quantizer), with the Ollama ``Modelfile`` of ``modelfile.py``.

``files.py`` names the files these folders hold; ``cli.py`` is the command line of
``scripts/export.py`` (also ``python -m qlora_ga.export``). Every form is written into a temporary
folder next to ``out_dir`` and renamed into place only when complete; an existing ``out_dir`` is
replaced only after the new one is fully written.
"""

from .adapter import config_scaling, export_adapter, fold_residuals, load_adapter_dir, save_adapter
from .base import resolve_base_folder
from .cli import build_parser, main
from .files import METADATA_FILE, RESIDUAL_FILE, RESIDUAL_FILES, read_metadata
from .gguf import GgufStats, gguf_export
from .merge import MergeStats, merge_export, parse_dtype, parse_size
from .modelfile import modelfile_text, ollama_chat

__all__ = [
    "config_scaling", "export_adapter", "fold_residuals", "load_adapter_dir", "save_adapter",
    "resolve_base_folder", "build_parser", "main", "METADATA_FILE", "RESIDUAL_FILE", "RESIDUAL_FILES",
    "read_metadata", "GgufStats", "gguf_export", "MergeStats", "merge_export", "parse_dtype", "parse_size",
    "modelfile_text", "ollama_chat",
]
