"""Random-weight models of a given architecture, built in NF4 layer by layer on the device, for benchmarks and tests.

A model of the Llama-2-7B (or 70B) shape needs no download and no 13 GB on disk to be measured: it is made on the
``meta`` device and materialized one decoder layer at a time on the target device with random N(0, 0.02) weights,
each target linear quantized at once into a bitsandbytes NF4 ``Linear4bit`` (double quantization, blocksize 64: the
settings of :func:`qlora_ga.model.load_model`). The peak while building is the 4-bit model plus one layer in the
compute dtype (~0.4 GB for 7B), so the 7B shape builds on a 24 GB card. The model is marked like a transformers-loaded
4-bit one (``is_loaded_in_4bit``), so PEFT dispatches its bitsandbytes LoRA layers to it.

- :func:`llama_config`, :data:`ARCHS`: the shapes (``TINY``: 4 layers of hidden 256, CPU-sized);
- :func:`build_random_llama`: the model on a device, in NF4 or not, from a seed;
- :func:`save_random_llama`: the same weights as a bf16 safetensors folder, for the real loading path;
- :class:`ModelFactory`: a benchmark's models, random (built or saved and loaded) or a real checkpoint;
- :func:`random_sequences`, :func:`random_batch`: seeded random token ids to feed them (every token a label).

:mod:`qlora_ga.testing` writes the small models of the test suite (several families, hidden 64) to disk instead.
"""

from __future__ import annotations

import gc
from pathlib import Path

import torch
from torch import nn

from .fileio import atomic_dir

LLAMA2_7B = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096)
TINY = dict(vocab_size=32000, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=4096)
LLAMA2_70B = dict(vocab_size=32000, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                  num_attention_heads=64, num_key_value_heads=8, max_position_embeddings=4096)
ARCHS = {"llama2-7b": LLAMA2_7B, "llama2-70b": LLAMA2_70B}


def llama_config(tiny: bool, dtype: torch.dtype, arch: str = "llama2-7b", layers: int | None = None):
    """transformers' ``LlamaConfig`` of ``arch`` (:data:`ARCHS`; ``tiny``: :data:`TINY`), ``layers`` decoder layers
    if given (else the architecture's own), no KV cache, ``dtype`` as its dtype."""
    from transformers import LlamaConfig

    shape = dict(TINY if tiny else ARCHS[arch])
    if layers is not None:
        shape["num_hidden_layers"] = layers
    cfg = LlamaConfig(**shape, tie_word_embeddings=False, rms_norm_eps=1e-5,
                      bos_token_id=1, eos_token_id=2, pad_token_id=0)
    cfg.use_cache = False
    cfg.dtype = dtype
    return cfg


def to_nf4(linear: nn.Linear, device: torch.device, compute_dtype: torch.dtype) -> nn.Module:
    """NF4 ``Linear4bit`` (double quant, blocksize 64: load_model's settings) holding ``linear``'s weight."""
    import bitsandbytes as bnb

    q = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                          compute_dtype=compute_dtype, compress_statistics=True, quant_type="nf4",
                          quant_storage=torch.uint8, device="meta")
    q.weight = bnb.nn.Params4bit(linear.weight.data, requires_grad=False, compress_statistics=True, quant_type="nf4",
                                 quant_storage=torch.uint8, blocksize=64, module=q).to(device)
    if linear.bias is not None:
        q.bias = nn.Parameter(linear.bias.data.to(device), requires_grad=False)
    return q


def _materialize(module: nn.Module, device: torch.device, std: float, recurse: bool = True):
    """Allocate a meta module's parameters on ``device`` (keeping their dtype) and fill them: N(0, std) for
    matrices, 1 for vectors (norm weights)."""
    module.to_empty(device=device, recurse=recurse)
    with torch.no_grad():
        for p in module.parameters(recurse=recurse):
            if p.dim() >= 2:
                p.normal_(0.0, std)
            else:
                p.fill_(1.0)


def _quantize_layer(layer: nn.Module, targets, device: torch.device, compute_dtype: torch.dtype):
    """Every target linear of one decoder layer replaced by its NF4 copy."""
    for name, mod in list(layer.named_modules()):
        if name and name.split(".")[-1] in targets and type(mod) is nn.Linear:
            parent = layer.get_submodule(name.rsplit(".", 1)[0]) if "." in name else layer
            setattr(parent, name.split(".")[-1], to_nf4(mod, device, compute_dtype))
            del mod


def _materialize_rest(model: nn.Module, cfg, device: torch.device, std: float):
    """What is still on the meta device after the decoder layers: embeddings, final norm, LM head (random) and the
    rotary embedding (rebuilt on ``device`` from ``cfg``)."""
    for mname, mod in list(model.named_modules()):
        if type(mod).__name__.endswith("RotaryEmbedding"):
            parent = model.get_submodule(mname.rsplit(".", 1)[0]) if "." in mname else model
            with torch.device(device):
                setattr(parent, mname.rsplit(".", 1)[-1], type(mod)(config=cfg))
            continue
        if any(p.is_meta for p in mod.parameters(recurse=False)):
            _materialize(mod, device, std, recurse=False)
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:
        raise RuntimeError(f"tensors left on the meta device: {left[:5]}")


def _mark_4bit(model: nn.Module, compute_dtype: torch.dtype):
    """What transformers' bitsandbytes quantizer sets on a 4-bit model (PEFT reads ``is_loaded_in_4bit``)."""
    from transformers.utils.quantization_config import QuantizationMethod

    from .arch import keep_4bit_trainable
    from .model import bnb_config

    model.config.quantization_config = bnb_config(compute_dtype)
    model.is_loaded_in_4bit = True
    model.is_quantized = True
    model.quantization_method = QuantizationMethod.BITS_AND_BYTES
    keep_4bit_trainable(model)


def build_random_llama(cfg, device: torch.device, dtype: torch.dtype, quantize: bool, seed: int = 0,
                       compute_dtype: torch.dtype | None = None):
    """The Llama of ``cfg`` with random weights, made on ``device`` one decoder layer at a time (eval mode).

    ``quantize``: every target linear of the decoder layers becomes an NF4 ``Linear4bit`` as soon as its
    layer exists (peak: the 4-bit model + one ``dtype`` layer); embeddings, norms and LM head stay ``dtype``.
    The same ``seed`` gives the same weights, quantized or not.
    """
    from transformers import LlamaForCausalLM

    from .arch import find_decoder_layers, resolve_targets

    device = torch.device(device)
    compute_dtype = compute_dtype or dtype
    torch.manual_seed(seed)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    model.to(dtype)
    std = getattr(cfg, "initializer_range", 0.02)
    _, layers = find_decoder_layers(model)
    targets = resolve_targets(model)
    for layer in layers:
        _materialize(layer, device, std)
        if quantize:
            _quantize_layer(layer, targets, device, compute_dtype)
    _materialize_rest(model, cfg, device, std)
    model.config.use_cache = False
    model.config.dtype = compute_dtype if quantize else dtype
    if quantize:
        _mark_4bit(model, compute_dtype)
    model.eval()
    free_memory(device)
    return model


def free_memory(device: torch.device):
    """Give back what dropped models held: Python's garbage, and on CUDA the allocator's cached blocks."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def save_random_llama(cfg, folder: Path, seed: int, say=print) -> Path:
    """The random model as a bf16 safetensors folder (+ a small tokenizer), built once on the host; an existing
    folder is reused. ``say`` gets one line when it writes."""
    folder = Path(folder)
    if (folder / "config.json").is_file():
        return folder
    from .testing import make_tiny_tokenizer

    say(f"writing the random model to {folder} (once) ...")
    model = build_random_llama(cfg, torch.device("cpu"), torch.bfloat16, quantize=False, seed=seed)
    model.config.dtype = torch.bfloat16
    with atomic_dir(folder, keep_existing=True) as tmp:  # (another process may have written it meanwhile)
        model.save_pretrained(tmp)
        make_tiny_tokenizer().save_pretrained(tmp)  # load_model wants a tokenizer; the benchmarks feed random ids
    del model
    free_memory(torch.device("cpu"))
    return folder


class ModelFactory:
    """A benchmark's models, made afresh on each call: :meth:`quantized` (NF4, the compute dtype) and
    :meth:`reference` (not quantized: bf16 on CUDA, fp32 on a CPU).

    ``model`` (hub id, folder, .gguf): that checkpoint through :func:`qlora_ga.model.load_model`. Else a random Llama
    (``tiny``, or ``arch`` with ``layers`` decoder layers) from ``seed``: built on the device (``materialize="direct"``)
    or saved once as a bf16 folder under ``workdir`` and loaded with ``load_model`` (``"disk"``: the real loading path).
    """

    def __init__(self, device: torch.device, *, model: str | None = None, tiny: bool = False, arch: str = "llama2-7b",
                 layers: int | None = None, materialize: str = "direct", workdir: str | Path = "./.bench", seed: int = 0):
        from .model import default_compute_dtype

        self.device, self.model, self.tiny, self.materialize, self.seed = device, model, tiny, materialize, seed
        self.compute_dtype = default_compute_dtype(device)
        self.ref_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        self.arch = arch
        self.cfg = llama_config(tiny, self.compute_dtype, arch, layers)
        self.folder = None
        self._vocab = None
        if model is None and materialize == "disk":
            name = f"random-{'tiny' if tiny else arch}-{self.cfg.num_hidden_layers}l-seed{seed}"
            self.folder = save_random_llama(llama_config(tiny, torch.bfloat16, arch, layers), Path(workdir) / name, seed)

    @property
    def label(self) -> str:
        if self.model:
            return self.model
        if self.tiny:
            what = f"random tiny Llama ({self.cfg.num_hidden_layers} layers, hidden 256)"
        else:
            full = ARCHS[self.arch]["num_hidden_layers"]
            n = self.cfg.num_hidden_layers
            what = f"random {self.arch} architecture" + (f" with {n} of its {full} layers" if n != full else "")
        return what + f" [{self.materialize}]"

    @property
    def vocab_size(self) -> int:
        """The vocabulary (of a checkpoint: known once one of its models was made)."""
        return self.cfg.vocab_size if self.model is None else self._vocab

    def quantized(self):
        return self._make(quantize=True)

    def reference(self):
        return self._make(quantize=False)

    def _make(self, quantize: bool):
        from .model import load_model

        dtype = self.compute_dtype if quantize else self.ref_dtype
        if self.model is not None or self.folder is not None:
            model, _ = load_model(self.model or str(self.folder), quantize=quantize, device=self.device,
                                  compute_dtype=dtype)
            self._vocab = model.config.vocab_size
            return model
        return build_random_llama(self.cfg, self.device, dtype, quantize=quantize, seed=self.seed,
                                  compute_dtype=self.compute_dtype)


def random_sequences(n: int, t: int, vocab: int, seed: int) -> list[dict]:
    """``n`` seeded examples of ``t`` random token ids (>= 3, past the special tokens), every token a label."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (n, t), generator=g)
    return [{"input_ids": row.tolist(), "labels": row.tolist()} for row in ids]


def random_batch(b: int, t: int, vocab: int, seed: int, device) -> dict:
    """A collated ``b`` x ``t`` batch of seeded random token ids on ``device`` (no padding, every token a label)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (b, t), generator=g)
    return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device), "labels": ids.to(device)}
