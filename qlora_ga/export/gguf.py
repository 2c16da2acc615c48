"""GGUF export for llama.cpp, Ollama and LM Studio (docs/DESIGN.md section 6), through llama.cpp's own converter.

``gguf_export(adapter_dir, out_dir, "q8_0")``:

1. merge the adapter into its base with the streaming merge of ``export/merge.py`` (fp16 by
   default, bf16 for ``--gguf bf16``), into a temporary folder next to ``out_dir``;
2. run llama.cpp's ``convert_hf_to_gguf.py`` on it as a program (``sys.executable``, its own
   ``conversion/`` package and ``gguf-py``), ``--outtype f16|bf16|q8_0``. Nothing of the converter is
   re-implemented or copied into this repository;
3. ``q4_k_m``: convert to f16, then quantize with llama.cpp's quantizer through ``llama-cpp-python``
   (``llama_cpp.llama_model_quantize``), run in a child process; without that package: a one-line
   error saying what to install;
4. write an Ollama ``Modelfile`` next to the GGUF (``export/modelfile.py``) and ``qlora_ga.json``
   (what was exported from what, with which converter); drop the merged folder (``merged_dir``:
   convert a merged folder that already exists instead, e.g. ``finetune.py --export-merged``'s); rename the
   temporary folder to ``out_dir``. ``out_dir`` then holds ``model-<type>.gguf``, ``Modelfile``
   and ``qlora_ga.json``; a failure at any step leaves ``out_dir`` as it was.

Where the converter comes from: ``llama_cpp`` (``--llama-cpp DIR``), a llama.cpp checkout holding
``convert_hf_to_gguf.py``; else the source distribution of ``llama-cpp-python`` pinned below
(version and sha256), which vendors llama.cpp, is downloaded once from PyPI and only the converter
files are extracted into ``$QLORA_GA_CACHE/llama.cpp/`` (atomically: a temp folder renamed when
complete). The converter needs ``sentencepiece`` for the Llama family (a dependency of this
package), ``numpy``, ``torch`` and ``transformers`` (already here) and its own ``gguf-py``.
"""

from __future__ import annotations

import errno
import hashlib
import importlib.util
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from ..config import GGUF_TYPES
from ..errors import QloraGaError
from ..fileio import atomic_dir
from .adapter import load_adapter_dir
from .files import METADATA_FILE, check_out_dir, check_out_not_over, check_type, read_metadata
from .merge import merge_export, resolve_base_folder
from .modelfile import model_chat, modelfile_text

log = logging.getLogger(__name__)

# The pinned llama.cpp converter: llama-cpp-python's source distribution on PyPI vendors llama.cpp.
LLAMA_CPP_PYTHON_VERSION = "0.3.36"
SDIST_URL = (
    "https://files.pythonhosted.org/packages/ec/e9/e7de2b0463ea3ffbf0ede6cb21b58c1258a8f6521aae45ca773a59fe7cf3/"
    "llama_cpp_python-0.3.36.tar.gz"
)
SDIST_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
SDIST_VENDOR = f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}/vendor/llama.cpp/"
#: what the converter needs from the llama.cpp tree (files, or folders ending in '/')
CONVERTER_FILES = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/", "LICENSE")
CONVERTER = "convert_hf_to_gguf.py"
SOURCE_FILE = "qlora_ga_source.json"

#: GGUF type -> (converter --outtype, merged-model dtype)
OUTTYPES = {"f16": ("f16", "fp16"), "bf16": ("bf16", "bf16"), "q8_0": ("q8_0", "fp16"), "q4_k_m": ("f16", "fp16")}
QUANTIZED_BY_LLAMA_CPP = {"q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M"}
PIP_LLAMA_CPP = f"pip install llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}"

assert set(OUTTYPES) == set(GGUF_TYPES)


def check_quantizer(gguf_type: str) -> None:
    """For types that llama.cpp's quantizer makes (q4_k_m): raise a one-line error when ``llama-cpp-python`` is missing."""
    if gguf_type in QUANTIZED_BY_LLAMA_CPP and importlib.util.find_spec("llama_cpp") is None:
        raise QloraGaError(
            f"GGUF type {gguf_type} needs llama.cpp's quantizer from llama-cpp-python: run '{PIP_LLAMA_CPP}' "
            "(it compiles llama.cpp, several minutes), or export --gguf q8_0 / f16"
        )


# ----------------------------------------------------------------------------- the converter


def converter_cache_dir() -> Path:
    from ..model import cache_dir

    return cache_dir() / "llama.cpp" / f"llama-cpp-python-{LLAMA_CPP_PYTHON_VERSION}"


def find_converter(llama_cpp: str | os.PathLike | None = None) -> Path:
    """The folder holding ``convert_hf_to_gguf.py``: ``llama_cpp`` if given, else the cached pinned copy (fetched once)."""
    if llama_cpp is not None:
        d = Path(llama_cpp).expanduser().absolute()  # the converter runs with this folder as its cwd
        if not (d / CONVERTER).is_file():
            raise QloraGaError(f"--llama-cpp '{d}' has no {CONVERTER}: pass the root folder of a llama.cpp checkout")
        return d
    d = converter_cache_dir()
    if (d / CONVERTER).is_file():
        return d
    return fetch_converter(d)


def _download(url: str, dest: Path) -> str:
    """Stream ``url`` into ``dest``; return the sha256 of what was written."""
    h = hashlib.sha256()
    with urllib.request.urlopen(url, timeout=60) as r, open(dest, "wb") as f:  # noqa: S310 - a fixed https URL
        while chunk := r.read(1 << 20):
            h.update(chunk)
            f.write(chunk)
    return h.hexdigest()


def _extract_converter(sdist: Path, dest: Path) -> None:
    """Extract only :data:`CONVERTER_FILES` of the vendored llama.cpp from the sdist into ``dest``."""
    n = 0
    with tarfile.open(sdist, "r:gz") as tar:
        for m in tar:
            if not m.isfile() or not m.name.startswith(SDIST_VENDOR):
                continue
            rel = m.name[len(SDIST_VENDOR):]
            if not any(rel == f or (f.endswith("/") and rel.startswith(f)) for f in CONVERTER_FILES):
                continue
            parts = Path(rel).parts
            if ".." in parts or Path(rel).is_absolute():
                continue
            target = dest.joinpath(*parts)
            target.parent.mkdir(parents=True, exist_ok=True)
            with tar.extractfile(m) as src, open(target, "wb") as out:
                shutil.copyfileobj(src, out)
            n += 1
    if not (dest / CONVERTER).is_file() or not (dest / "gguf-py" / "gguf").is_dir():
        raise QloraGaError(f"the llama-cpp-python {LLAMA_CPP_PYTHON_VERSION} source has no vendor/llama.cpp/{CONVERTER}")
    log.info("extracted %d converter files", n)


def fetch_converter(dest: Path | None = None) -> Path:
    """Download the pinned ``llama-cpp-python`` sdist, check its sha256 and extract the converter into ``dest`` atomically."""
    dest = Path(dest) if dest is not None else converter_cache_dir()
    what = f"llama.cpp's converter (llama-cpp-python {LLAMA_CPP_PYTHON_VERSION} source from PyPI)"
    hint = "pass a llama.cpp checkout with --llama-cpp DIR"
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        download = tempfile.TemporaryDirectory(prefix=f".{dest.name}.download-", dir=dest.parent)
    except OSError as e:
        raise QloraGaError(f"cannot fetch {what}: cannot write the cache folder {dest.parent} ({e.strerror or e}): {hint}") from None
    # keep_existing: another process may have fetched it meanwhile
    with download as scratch, atomic_dir(dest, keep_existing=True) as conv:
        sdist = Path(scratch) / "sdist.tar.gz"
        print(f"fetching {what} into {dest} (once)", flush=True)
        try:
            digest = _download(SDIST_URL, sdist)
        except OSError as e:  # URLError, timeouts, disk errors
            reason = getattr(e, "reason", None) or getattr(e, "strerror", None) or str(e) or type(e).__name__
            raise QloraGaError(f"cannot fetch {what}: {reason}: {hint}") from None
        if digest != SDIST_SHA256:
            raise QloraGaError(f"cannot fetch {what}: sha256 {digest[:16]}... is not the pinned {SDIST_SHA256[:16]}...: {hint}")
        try:
            _extract_converter(sdist, conv)
        except (tarfile.TarError, EOFError) as e:
            raise QloraGaError(f"cannot fetch {what}: the archive is damaged ({e}): {hint}") from None
        (conv / SOURCE_FILE).write_text(json.dumps(
            {"package": "llama-cpp-python", "version": LLAMA_CPP_PYTHON_VERSION, "url": SDIST_URL, "sha256": SDIST_SHA256},
            indent=1))
    return dest


def converter_source(conv: Path) -> dict:
    """What the converter in ``conv`` is (recorded in the export's ``qlora_ga.json``)."""
    src = conv / SOURCE_FILE
    if src.is_file():
        return json.loads(src.read_text())
    return {"llama_cpp_dir": str(conv.absolute())}


def _last_line(*texts: str) -> str:
    for text in texts:
        lines = [ln.strip() for ln in re.split(r"[\r\n]+", text or "") if ln.strip()]
        if lines:
            return lines[-1]
    return "no output"


PIP_NAMES = {"google": "protobuf", "mistral_common": "mistral-common"}  # module -> package, where they differ


def _hint(line: str) -> str:
    m = re.search(r"No module named '([\w.]+)'", line)
    if not m:
        return ""
    module = m.group(1).split(".")[0]
    return f": install it with 'pip install {PIP_NAMES.get(module, module)}'"


# Run before the child's own program (Linux): the kernel sends the child SIGKILL when its parent dies, even by
# SIGKILL; a parent that died before the prctl call is caught by the getppid check. Then exec the program (same pid).
_DIE_WITH_PARENT = """\
import ctypes, os, signal, sys
ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
if os.getppid() != int(sys.argv[1]):
    sys.exit(1)
os.execv(sys.argv[2], sys.argv[2:])
"""


def run_child(cmd: list[str], **popen_kw) -> subprocess.CompletedProcess:
    """Run ``cmd`` to completion (stdin closed, stdout/stderr captured as text) without ever leaving it running alone.

    On Linux it is started so that it is killed when this process dies, even by SIGKILL (``PR_SET_PDEATHSIG``;
    set in a small launcher that then execs ``cmd``, not in ``preexec_fn``, which is unsafe with threads). When
    this process is interrupted (Ctrl-C) or fails while waiting, the child is killed and waited for before the
    exception goes on, so nothing writes into a folder that is being removed.
    """
    if sys.platform.startswith("linux"):
        cmd = [sys.executable, "-c", _DIE_WITH_PARENT, str(os.getpid()), *cmd]
    with subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          errors="replace", **popen_kw) as proc:
        try:
            out, err = proc.communicate()
        except BaseException:
            proc.kill()
            proc.wait()
            raise
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def run_converter(conv: Path, model_dir: Path, outfile: Path, outtype: str) -> None:
    """``python convert_hf_to_gguf.py MODEL_DIR --outfile OUTFILE --outtype OUTTYPE`` in ``conv``; its last line on failure."""
    paths = [str(conv / "gguf-py"), str(conv)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(paths), TQDM_DISABLE="1")
    cmd = [sys.executable, str(conv / CONVERTER), str(model_dir), "--outfile", str(outfile), "--outtype", outtype]
    proc = run_child(cmd, cwd=conv, env=env)
    if proc.returncode != 0 or not outfile.is_file():
        last = _last_line(proc.stderr, proc.stdout)
        _raise_if_no_space(last)
        raise QloraGaError(f"llama.cpp's converter failed (exit {proc.returncode}): {last}{_hint(last)}")


_QUANTIZE = """\
import ctypes, sys
import llama_cpp as L
p = L.llama_model_quantize_default_params()
p.ftype = getattr(L, sys.argv[3])
rc = L.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), ctypes.byref(p))
sys.exit(1 if rc else 0)
"""


def run_quantizer(infile: Path, outfile: Path, gguf_type: str) -> None:
    """llama.cpp's quantizer (``llama_model_quantize`` of llama-cpp-python) in a child process; its last line on failure."""
    check_quantizer(gguf_type)
    cmd = [sys.executable, "-c", _QUANTIZE, str(infile), str(outfile), QUANTIZED_BY_LLAMA_CPP[gguf_type]]
    proc = run_child(cmd)
    if proc.returncode != 0 or not outfile.is_file():
        last = _last_line(proc.stderr, proc.stdout)
        _raise_if_no_space(last)
        raise QloraGaError(f"llama.cpp's quantizer (llama-cpp-python) failed for {gguf_type} (exit {proc.returncode}): {last}")


def _raise_if_no_space(text: str) -> None:
    """A child process that died of a full disk: raise it as ENOSPC (``gguf_export`` names the folder)."""
    if "No space left on device" in text or "Errno 28" in text:
        raise OSError(errno.ENOSPC, "No space left on device")


# ----------------------------------------------------------------------------- the export


@dataclass
class GgufStats:
    out_dir: str
    gguf_file: str
    gguf_type: str
    bytes: int
    chat_format: str | None
    converter: dict


def check_disk_space(weights_folder: Path, out_dir: Path, gguf_type: str, merging: bool = True) -> None:
    """Refuse early when the merged model (if ``merging``) + the GGUF (+ the f16 intermediate of q4_k_m) cannot fit
    beside ``out_dir``; sizes estimated from the safetensors in ``weights_folder``."""
    weights = sum(p.stat().st_size for p in weights_folder.glob("*.safetensors"))
    need = weights * (1 + merging + (gguf_type in QUANTIZED_BY_LLAMA_CPP))
    free = shutil.disk_usage(out_dir.parent).free
    if free < need:
        raise QloraGaError(
            f"not enough disk space for the GGUF export in {out_dir.parent}: about {need / 1e9:.2f} GB needed "
            f"({'merged model + ' if merging else ''}GGUF), {free / 1e9:.2f} GB free: free some space or choose another --out"
        )


def gguf_export(
    adapter_dir,
    out_dir,
    gguf_type: str,
    *,
    llama_cpp=None,
    base: str | None = None,
    merge_base: str = "original",
    dtype: str | None = None,
    max_shard_size="2GB",
    merged_dir=None,
    overwrite: bool | None = None,
) -> GgufStats:
    """Merge the adapter, convert with llama.cpp's converter (and quantizer), write the GGUF + Modelfile into ``out_dir``.

    ``dtype``: dtype of the intermediate merged model (default fp16; bf16 for ``gguf_type='bf16'``).
    ``merged_dir``: a merged model folder already written by :func:`~qlora_ga.export.merge.merge_export` (e.g. by
    ``finetune.py --export-merged``) to convert instead of merging again (``base``, ``merge_base``, ``dtype``
    and ``max_shard_size`` then do not apply).
    ``out_dir`` may not be, hold or lie inside the adapter, base or merged folder, nor be or hold ``llama_cpp``. ``overwrite``:
    ``None`` replaces an existing ``out_dir`` whatever it holds (the caller owns it, e.g. finetune.py's run
    folder); ``False`` / ``True`` apply the command line's rule (:func:`~qlora_ga.export.files.check_out_dir`:
    only an earlier GGUF export, and only with ``True``).
    Everything happens in a temporary folder next to ``out_dir``, renamed into place at the end; the converter
    and the quantizer run as child processes that die with this one (:func:`run_child`).
    """
    check_type(gguf_type)
    check_quantizer(gguf_type)
    out = Path(out_dir).expanduser().absolute()
    _check_folders(adapter_dir, out, gguf_type, base, merged_dir, llama_cpp, overwrite)
    conv = find_converter(llama_cpp)
    name = f"model-{gguf_type}.gguf"
    try:
        with atomic_dir(out) as tmp:
            if merged_dir is None:
                merged = tmp / "merged"
                merge_export(adapter_dir, merged, base=base, dtype=dtype or OUTTYPES[gguf_type][1], merge_base=merge_base,
                             max_shard_size=max_shard_size)
            else:
                merged = Path(merged_dir).expanduser().absolute()
            _convert(conv, merged, tmp / name, gguf_type)
            chat = model_chat(merged)
            (tmp / "Modelfile").write_text(modelfile_text(name, chat), encoding="utf-8")
            _write_record(tmp, merged, adapter_dir, gguf_type, name, converter_source(conv), chat.format)
            if merged_dir is None:
                shutil.rmtree(merged)
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise QloraGaError(f"no space left on the device of {out.parent}: free some space or choose another --out") from None
        raise
    return GgufStats(str(out), str(out / name), gguf_type, (out / name).stat().st_size, chat.format, converter_source(conv))


def _check_folders(adapter_dir, out: Path, gguf_type: str, base, merged_dir, llama_cpp, overwrite) -> None:
    """Refuse before anything is written: a bad adapter or merged folder, an ``out`` over an input or over
    what it may not replace, too little disk."""
    inputs = {"adapter": Path(adapter_dir).expanduser()}
    if merged_dir is None:
        config, _, meta = load_adapter_dir(adapter_dir)
        base_name = base or (meta or {}).get("base_model") or config.base_model_name_or_path
        weights = inputs["base model"] = resolve_base_folder(str(base_name)) if base_name else None
    else:
        weights = inputs["merged model"] = Path(merged_dir).expanduser().absolute()
        if not (weights / "config.json").is_file():
            raise QloraGaError(f"'{weights}' has no config.json: pass a merged model folder")
    check_out_not_over(out, inputs)
    check_out_not_over(out, {"llama.cpp": llama_cpp}, may_be_inside=True)  # e.g. llama.cpp/models/mine is fine
    if overwrite is not None:
        check_out_dir(out, "gguf", overwrite)
    if weights is not None:
        check_disk_space(weights, out, gguf_type, merging=merged_dir is None)


def _convert(conv: Path, merged: Path, gguf_file: Path, gguf_type: str) -> None:
    """The converter straight to ``gguf_type``, or to f16 and then llama.cpp's quantizer (q4_k_m)."""
    outtype = OUTTYPES[gguf_type][0]
    if gguf_type not in QUANTIZED_BY_LLAMA_CPP:
        run_converter(conv, merged, gguf_file, outtype)
        return
    f16 = gguf_file.with_name(f"model-{outtype}.gguf")
    run_converter(conv, merged, f16, outtype)
    run_quantizer(f16, gguf_file, gguf_type)
    f16.unlink()


def _write_record(tmp: Path, merged: Path, adapter_dir, gguf_type: str, name: str, converter: dict, chat_format) -> None:
    """The export's ``qlora_ga.json``: what was exported from what, with which converter."""
    merged_meta = read_metadata(merged) or {}
    (tmp / METADATA_FILE).write_text(json.dumps({
        "format": "qlora-ga-gguf", "gguf_type": gguf_type, "gguf_file": name,
        "merged_dtype": merged_meta.get("dtype"), "merge_base": merged_meta.get("merge_base"),
        "adapter": str(adapter_dir), "base_model": merged_meta.get("base_model"),
        "converter": converter, "chat_format": chat_format,
    }, indent=1), encoding="utf-8")


__all__ = [
    "GGUF_TYPES", "LLAMA_CPP_PYTHON_VERSION", "SDIST_URL", "SDIST_SHA256", "check_type", "check_quantizer",
    "find_converter", "fetch_converter", "run_child", "run_converter", "run_quantizer", "gguf_export", "GgufStats",
]
