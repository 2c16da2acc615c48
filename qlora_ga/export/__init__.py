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

_LAZY = {
    "config_scaling": "adapter",
    "export_adapter": "adapter",
    "fold_residuals": "adapter",
    "load_adapter_dir": "adapter",
    "save_adapter": "adapter",
    "resolve_base_folder": "base",
    "build_parser": "cli",
    "main": "cli",
    "METADATA_FILE": "files",
    "RESIDUAL_FILE": "files",
    "RESIDUAL_FILES": "files",
    "read_metadata": "files",
    "GgufStats": "gguf",
    "gguf_export": "gguf",
    "MergeStats": "merge",
    "merge_export": "merge",
    "parse_dtype": "merge",
    "parse_size": "files",
    "modelfile_text": "modelfile",
    "ollama_chat": "modelfile",
}


def __getattr__(name: str):  # PEP 562: torch loads on first use, after the command line is checked
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:  # the lazy names too (tab completion, help())
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "config_scaling", "export_adapter", "fold_residuals", "load_adapter_dir", "save_adapter",
    "resolve_base_folder", "build_parser", "main", "METADATA_FILE", "RESIDUAL_FILE", "RESIDUAL_FILES",
    "read_metadata", "GgufStats", "gguf_export", "MergeStats", "merge_export", "parse_dtype", "parse_size",
    "modelfile_text", "ollama_chat",
]
