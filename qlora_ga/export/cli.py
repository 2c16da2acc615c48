"""The export command line (``scripts/export.py``, ``python -m qlora_ga.export``): adapter, ``--merge`` or ``--gguf TYPE``."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from ..errors import QloraGaError, system_error_line
from ..log import quiet_libraries
from .files import MERGE_BASES, check_adapter_dir, check_type, parse_size


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2 (argparse's default prints the whole usage)
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser(prog: str = "export.py") -> argparse.ArgumentParser:
    p = _Parser(prog=prog, description="Export a trained adapter: vanilla PEFT adapter, a merged 16-bit model, or a GGUF.")
    p.add_argument("--adapter", required=True, help="adapter folder (PEFT format, as written by training)")
    p.add_argument("--out", required=True,
                   help="output folder: new, empty, or (with --overwrite) an earlier export of the same kind, which is "
                        "replaced atomically when the export succeeds; anything else is refused")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an earlier export of the same kind in --out (never a folder qlora-ga did not write)")
    p.add_argument("--merge", action="store_true", help="merge the adapter into the base and write a full model")
    p.add_argument("--gguf", default=None, metavar="TYPE",
                   help="merge, then convert with llama.cpp's converter to a GGUF (f16, bf16, q8_0 or q4_k_m) and "
                        "write an Ollama Modelfile beside it")
    p.add_argument("--llama-cpp", default=None, metavar="DIR",
                   help="llama.cpp checkout holding convert_hf_to_gguf.py; default: fetched once from the "
                        "llama-cpp-python source on PyPI into the cache")
    p.add_argument("--dtype", default=None, choices=["fp16", "bf16", "fp32"],
                   help="merged weights dtype (default fp16; bf16 for --gguf bf16)")
    p.add_argument("--merge-base", default="original", choices=MERGE_BASES,
                   help="merge into the original 16-bit weights (default) or into deQ(Q(W)), the exact trained function")
    p.add_argument("--base", default=None, help="base model (folder, hub id or .gguf); default: the one the adapter names")
    p.add_argument("--max-shard-size", default="2GB", help="merged shard size (default 2GB)")
    return p


def main(argv=None, prog: str = "export.py") -> int:
    args = build_parser(prog).parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    quiet_libraries()
    try:
        written = _export(args)
    except KeyboardInterrupt:  # Ctrl-C: the temporary folder is gone, a converter child killed (gguf.run_child)
        print("interrupted: nothing was written to --out", file=sys.stderr)
        return 130
    except QloraGaError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (OSError, MemoryError) as e:
        print(system_error_line(e), file=sys.stderr)
        return 2
    print(written)
    return 0


def _check_arguments(args) -> None:
    """What needs neither torch nor the adapter's files first (the flags, their values), then the adapter folder:
    a mistake is answered before torch loads, in about a second."""
    if args.gguf is not None:
        check_type(args.gguf)
    elif args.llama_cpp is not None:
        raise QloraGaError("--llama-cpp only applies with --gguf")
    elif not args.merge and (args.dtype is not None or args.merge_base != "original" or args.base):
        raise QloraGaError("--dtype, --merge-base and --base only apply with --merge or --gguf")
    if args.gguf is not None or args.merge:
        parse_size(args.max_shard_size)
    check_adapter_dir(Path(args.adapter).expanduser())


def _export(args) -> str:
    """Run the export the arguments ask for; the line that says what was written."""
    _check_arguments(args)
    from .adapter import export_adapter
    from .gguf import gguf_export
    from .merge import merge_export

    if args.gguf is not None:
        g = gguf_export(args.adapter, args.out, args.gguf, llama_cpp=args.llama_cpp, base=args.base,
                        merge_base=args.merge_base, dtype=args.dtype, max_shard_size=args.max_shard_size,
                        overwrite=args.overwrite)
        return (f"GGUF {g.gguf_type} written to {g.gguf_file} ({g.bytes / 1e6:.1f} MB) with an Ollama Modelfile "
                f"({'chat template: ' + g.chat_format if g.chat_format else 'no chat template: see the warning in it'})")
    if args.merge:
        stats = merge_export(args.adapter, args.out, base=args.base, dtype=args.dtype or "fp16",
                             merge_base=args.merge_base, max_shard_size=args.max_shard_size, overwrite=args.overwrite)
        return (f"merged model written to {stats.out_dir}: {stats.tensors_written} tensors "
                f"({stats.tensors_merged} merged) in {stats.shards} shard(s), {stats.total_bytes / 1e6:.1f} MB, "
                f"peak {stats.peak_bytes / 1e6:.1f} MB held")
    return f"adapter written to {export_adapter(args.adapter, args.out, overwrite=args.overwrite)}"
