"""Packed-sequence attention without a dense mask: one SDPA call per sequence of a padding-free row.

transformers gives SDPA a flattened row's block-diagonal attention as a dense ``N x N`` mask (N = the row's
tokens), and SDPA then computes all ``N^2`` scores: for a micro-batch of B sequences of ~L tokens that is
B times the attention work of the padded batch (B L^2), which on a CPU ate the whole saving of dropping the
padding (measured: docs/RESULTS.md section 11). flash-attention's varlen kernels avoid it on GPUs that have
them; this does the same with plain SDPA, so it works on every device: the row is cut where
``position_ids`` restart and each sequence attends causally to itself alone (``is_causal=True``, no mask),
``sum(L_i^2)`` work, at most the padded batch's.

It is registered with transformers as the attention implementation :data:`PACKED_SDPA` (an
``AttentionInterface`` function and an ``AttentionMaskInterface`` mask function) and used in place of
``"sdpa"`` (:func:`set_attention`, from ``qlora_ga.data.padding_free_support``) for a run that flattens its
micro-batches. Batches with a 2-D
``attention_mask`` (padded batches, generation) and decoding steps go through transformers' own SDPA path
unchanged, so the same model serves both. A layer's sliding window (Qwen2, Mistral) is applied inside each
sequence; families whose attention needs more than causality and a window (chunked attention, soft-capping,
position biases) keep transformers' dense-mask path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

PACKED_SDPA = "qlora_ga_sdpa_packed"
#: layer types this attention handles (anything else keeps the dense-mask SDPA path)
HANDLED_LAYER_TYPES = ("full_attention", "sliding_attention")

_registered = False
# (position_ids, its version counter, its segments): every layer of a forward shares them; the version counter
# catches a buffer refilled in place with another layout
_last: tuple[torch.Tensor, int, list] | None = None


def _segments(position_ids: torch.Tensor) -> list[list[tuple[int, int]]]:
    """Per row, the ``(start, end)`` of each sequence: a new one starts wherever the position is not the previous
    one + 1 (as transformers' ``find_packed_sequence_indices`` reads a packed row)."""
    global _last
    if _last is not None and _last[0] is position_ids and _last[1] == position_ids._version:
        return _last[2]
    pos = position_ids.detach()
    starts = torch.ones_like(pos, dtype=torch.bool)
    starts[:, 1:] = pos[:, 1:] != pos[:, :-1] + 1
    n = pos.shape[1]
    out = []
    for row in starts.cpu().tolist():  # one host sync per forward (cached for the other layers)
        idx = [i for i, s in enumerate(row) if s] + [n]
        out.append(list(zip(idx[:-1], idx[1:])))
    _last = (position_ids, position_ids._version, out)
    return out


def _window_mask(length: int, window: int, device) -> torch.Tensor:
    """Causal within ``window`` tokens (transformers' sliding window: key j is seen from query i if 0 <= i - j < window)."""
    i = torch.arange(length, device=device)
    d = i[:, None] - i[None, :]
    return (d >= 0) & (d < window)


def packed_sdpa_forward(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                        is_causal=None, **kwargs):
    """An ``AttentionInterface`` function: ``query`` ``[B, H, N, D]``, ``key``/``value`` ``[B, H_kv, N, D]``; returns
    ``([B, N, H, D], None)`` like transformers' ``sdpa_attention_forward``, to which everything but a
    mask-free, cache-free forward with ``position_ids`` goes."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    position_ids = kwargs.get("position_ids")
    if attention_mask is not None or position_ids is None or query.shape[2] != key.shape[2] \
            or kwargs.get("position_bias") is not None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    if kwargs.get("softcap") is not None:
        raise ValueError(f"{PACKED_SDPA} attention does not support softcap")
    window = kwargs.get("sliding_window") or getattr(module, "sliding_window", None)
    return _per_sequence(query, key, value, position_ids, getattr(module, "num_key_value_groups", 1), window,
                         dropout, scaling), None


@torch.compiler.disable  # the row's segments are read on the host: under --compile this stays eager (one graph break)
def _per_sequence(query, key, value, position_ids, groups: int, window, dropout: float, scaling) -> torch.Tensor:
    """One causal SDPA call per sequence of each row (``window``: a sliding window inside each); ``[B, N, H, D]``."""
    from transformers.integrations.sdpa_attention import repeat_kv

    if groups > 1:
        key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    if position_ids.shape[0] != query.shape[0]:
        position_ids = position_ids.expand(query.shape[0], -1)
    rows = []
    for b, segments in enumerate(_segments(position_ids)):
        parts = []
        for s, e in segments:
            q, k, v = query[b : b + 1, :, s:e], key[b : b + 1, :, s:e], value[b : b + 1, :, s:e]
            if window and e - s > window:
                parts.append(F.scaled_dot_product_attention(q, k, v, attn_mask=_window_mask(e - s, window, q.device),
                                                            dropout_p=dropout, scale=scaling))
            else:
                parts.append(F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, scale=scaling,
                                                            is_causal=e - s > 1))
        rows.append(torch.cat(parts, dim=2) if len(parts) > 1 else parts[0])
    out = torch.cat(rows, dim=0) if len(rows) > 1 else rows[0]
    return out.transpose(1, 2).contiguous()


def packed_sdpa_mask(*args, attention_mask=None, **kwargs):
    """An ``AttentionMaskInterface`` function: no mask for a batch without a 2-D ``attention_mask`` (the attention
    function cuts the row by ``position_ids`` itself), else transformers' SDPA mask."""
    from transformers.masking_utils import sdpa_mask

    if attention_mask is None:
        return None
    return sdpa_mask(*args, attention_mask=attention_mask, **kwargs)


def register():
    """Register :data:`PACKED_SDPA` with transformers (once)."""
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(PACKED_SDPA, packed_sdpa_forward)
    AttentionMaskInterface.register(PACKED_SDPA, packed_sdpa_mask)
    _registered = True


def can_use_packed_sdpa(config) -> bool:
    """Whether a model of ``config`` runs SDPA attention that needs only causality and a sliding window."""
    layer_types = getattr(config, "layer_types", None) or []
    return (getattr(config, "_attn_implementation", None) == "sdpa"
            and all(t in HANDLED_LAYER_TYPES for t in layer_types)
            and getattr(config, "attn_logit_softcapping", None) is None)


def set_attention(model, name: str) -> str:
    """Switch ``model`` (a PEFT wrapper or the transformers model) to attention implementation ``name``; returns the
    one it had. Every sub-config that names an implementation is switched (multimodal wrappers keep one per part)."""
    from .arch import unwrap

    base = unwrap(model)
    old = base.config._attn_implementation
    if name == PACKED_SDPA:
        register()
    for module in base.modules():
        cfg = getattr(module, "config", None)
        if cfg is not None and getattr(cfg, "_attn_implementation", None) == old:
            cfg._attn_implementation = name
    return old
