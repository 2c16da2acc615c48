"""Architecture introspection: where a family keeps its decoder blocks, which linears get adapters, and the
4-bit layers' trainable layout. Used by every step after loading (the gradient pass, the init, training, the
exports); loading itself is :mod:`qlora_ga.model`.
"""

from __future__ import annotations

import torch
from torch import nn

from .constants import ALL_LINEAR, DEFAULT_TARGETS
from .errors import QloraGaError

ROUTER_NAMES = ("gate", "router", "shared_expert_gate")  # MoE routing linears: never adapted
LAYER_LISTS = ("layers", "h", "blocks", "block")  # where families keep their decoder blocks


def unwrap(model: nn.Module) -> nn.Module:
    """The transformers model under a PEFT wrapper (or ``model`` itself)."""
    get = getattr(model, "get_base_model", None)
    return get() if callable(get) else model


def find_decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """``(qualified name, decoder blocks)`` from the model's own structure (``get_decoder().layers`` or its equivalent)."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    owner = next((n for n, m in model.named_modules() if m is decoder), None)
    for attr in LAYER_LISTS:
        layers = getattr(decoder, attr, None)
        if isinstance(layers, nn.ModuleList) and len(layers) > 0 and owner is not None:
            return (f"{owner}.{attr}" if owner else attr), layers
    raise QloraGaError(
        f"cannot find the decoder layers of {type(model).__name__} (no {'/'.join(LAYER_LISTS)} list on its decoder "
        f"{type(decoder).__name__}): only decoder-stack causal LMs are supported"
    )


def resolve_targets(model: nn.Module, target_modules=DEFAULT_TARGETS) -> tuple[str, ...]:
    """The names of the linears that get adapters.

    ``"all-linear"`` (the default): the last name part of every linear inside the decoder blocks, in
    the order they appear in the blocks (e.g. ``q_proj, ..., down_proj``; Phi-3's fused
    ``qkv_proj``, ``gate_up_proj``), without MoE routers (:data:`ROUTER_NAMES`) and without the LM
    head. Other names (a comma-separated string or a sequence) are taken as given.
    """
    names = [t.strip() for t in (target_modules.split(",") if isinstance(target_modules, str) else target_modules)]
    names = [t for t in names if t]
    if names != [ALL_LINEAR]:
        return tuple(names)
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = find_decoder_layers(model)[1] if hasattr(model, "get_decoder") else [model]  # a model, or one block
    found: dict[str, None] = {}
    for layer in layers:
        adapted: list[str] = []  # a PEFT-wrapped linear counts once, not its base_layer / lora_A / lora_B
        for name, mod in layer.named_modules():
            if not name or any(name.startswith(a + ".") for a in adapted):
                continue
            last = name.split(".")[-1]
            if isinstance(mod, BaseTunerLayer):
                adapted.append(name)
            elif not is_linear(mod):
                continue
            if last not in ROUTER_NAMES:
                found.setdefault(last)
    return tuple(found)


def unadapted_experts(model: nn.Module) -> list[str]:
    """Classes of MoE expert modules whose weights are fused 3-D parameters (no linears: they get no adapters)."""
    _, layers = find_decoder_layers(model)
    found: dict[str, None] = {}
    for mod in layers.modules():
        if any(p.dim() == 3 for p in mod.parameters(recurse=False)):
            found.setdefault(type(mod).__name__)
    return list(found)


def is_linear(module: nn.Module) -> bool:
    import bitsandbytes as bnb

    return isinstance(module, (nn.Linear, bnb.nn.Linear4bit))


def target_linears(module: nn.Module, target_modules=DEFAULT_TARGETS, prefix: str = "") -> dict[str, nn.Module]:
    """``{qualified name: linear}`` for every linear below ``module`` whose last name part is a target.

    ``target_modules``: names, or ``"all-linear"`` (then ``module`` must be the whole model; see :func:`resolve_targets`).
    """
    targets = set(resolve_targets(module, target_modules))
    out = {}
    for name, mod in module.named_modules():
        if name and name.split(".")[-1] in targets and is_linear(mod):
            out[f"{prefix}{name}"] = mod
    return out


def keep_4bit_trainable(model: nn.Module) -> None:
    """Stop bitsandbytes from repacking 4-bit weights for CPU inference.

    On CPUs with AVX512-BF16, bitsandbytes converts a Linear4bit's weight to an inference-only
    layout on the first eval-mode forward without grad; after that the layer has no autograd path
    (no gradient flows through it) and its stored bytes differ. The gradient pass and training both
    need the trainable layout, so the conversion is switched off (and undone where it happened).
    """
    import bitsandbytes as bnb

    for mod in model.modules():
        if isinstance(mod, bnb.nn.Linear4bit):
            mod.support_avx512bf16_for_cpu = False
            w = mod.weight
            if getattr(getattr(w, "quant_state", None), "packing_format_for_cpu", False):
                w.data, w.quant_state = _unpack_for_cpu(w.data, w.quant_state)


def _unpack_for_cpu(data, quant_state):
    """Undo bitsandbytes' CPU inference packing, through its private helper (imported only when a weight is packed)."""
    try:
        from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse
    except ImportError:
        import bitsandbytes

        raise QloraGaError(
            f"bitsandbytes {bitsandbytes.__version__} packed a 4-bit weight for CPU inference and cannot unpack it: "
            "install bitsandbytes 0.50.x ('pip install bitsandbytes==0.50.2')"
        ) from None
    return _convert_weight_packed_for_cpu_inverse(data, quant_state)


def dequantized_weight(linear: nn.Module) -> torch.Tensor:
    """The weight a linear really computes with (``deQ(Q(W))`` for a 4-bit layer), as a new fp32 tensor."""
    import bitsandbytes as bnb

    if isinstance(linear, bnb.nn.Linear4bit):
        w = linear.weight
        return bnb.functional.dequantize_4bit(w.data, w.quant_state).float()
    return linear.weight.detach().float().clone()
