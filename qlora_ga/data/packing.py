"""No compute on padding: padding-free micro-batches, sequence packing, and whether a model supports them.

**Padding-free** (TRL's ``padding_free``, transformers' ``DataCollatorWithFlattening``): the sequences of a
micro-batch go one after another into one row, ``position_ids`` restarting at 0 at every sequence, no
``attention_mask``. transformers then builds the attention itself: with no 2-D mask, no cache and
``position_ids`` that restart, ``masking_utils`` detects the packed format and makes the causal mask
block-diagonal by sequence for SDPA, eager and flex attention; flash-attention's varlen kernels take
the boundaries from the same ``position_ids``. The first label of every sequence is -100: it would be
the target of the previous sequence's last token (in a padded row nothing predicts a row's first
token either), so the loss sums the same token losses over the same label tokens as the padded batch.

**Packing** (TRL's ``packing``, best-fit decreasing): whole sequences are packed into rows of at most
``max_length`` tokens (:func:`best_fit_decreasing`, over a shuffled window of the epoch's seeded
order; ``train.StepBatches`` makes the rows of an epoch and hands them out by step); each row is
collated the same way (:func:`collate_packed`), so a row's attention is block-diagonal by sequence
and no sequence is ever split.

**Which models** (:func:`padding_free_support`): the attention implementation must be one whose masks
transformers builds from ``position_ids`` (or flash-attention's varlen path), and a probe on the model
itself must give a sequence the same logits alone and after another sequence in the same row. A model on
SDPA is then switched to :data:`~qlora_ga.attention.PACKED_SDPA` (one SDPA call per sequence instead of a
dense row-long mask: ``qlora_ga/attention.py``), probed again, and kept on it when that probe agrees too. A layer
that mixes tokens along the row whatever the mask (a convolution or state-space layer, an attention
implementation without the packed mask) fails the probe and is refused, never guessed.
"""

from __future__ import annotations

import bisect

import torch

from ..attention import PACKED_SDPA, can_use_packed_sdpa, set_attention
from ..constants import IGNORE_INDEX
from ..arch import unwrap

#: attention implementations whose masks transformers makes block-diagonal from restarting position_ids
#: (masking_utils' packed-sequence detection), or whose kernels read the boundaries from them (flash varlen)
PACKED_ATTENTION = ("sdpa", "eager", "flex_attention", "flash_attention_2", "flash_attention_3", PACKED_SDPA)
#: layer types (``config.layer_types``) that attend; any other (``conv``, ``mamba``, ``linear_attention``, ...) mixes
#: tokens along the row whatever the mask, so a model with one cannot be flattened
ATTENTION_LAYER_TYPES = ("full_attention", "sliding_attention", "chunked_attention")
#: state-space / recurrent families without ``layer_types``: every layer mixes tokens along the row
RECURRENT_MODEL_TYPES = ("mamba", "mamba2", "falcon_mamba", "rwkv", "xlstm")
#: the probe's bound on the relative logit difference: numerical noise is ~1e-6 in fp32 (measured 2e-6 at most on
#: the tiny families), a layer that mixes across the boundary shows at 3e-4 even in a random tiny model (Lfm2's conv)
PROBE_TOL = {torch.float32: 2e-5}
PROBE_TOL_16BIT = 5e-2
#: packing: the seeded epoch order is packed in windows of this many sequences (best-fit decreasing in each)
PACK_WINDOW = 1000


def _own_length(ex: dict) -> int | None:
    """Tokens of ``ex`` without trailing padding of its own ``attention_mask``; None if it has padding inside."""
    n = len(ex["input_ids"])
    if "attention_mask" not in ex:
        return n
    mask = [int(v) for v in ex["attention_mask"]]
    k = n
    while k > 0 and mask[k - 1] == 0:
        k -= 1
    return k if all(mask[:k]) else None


def can_flatten(examples: list[dict]) -> bool:
    """Whether every example can go into a flattened row as it is (no padding inside its own attention_mask)."""
    return all(_own_length(ex) for ex in examples)


def collate_packed(rows: list[list[dict]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """``input_ids``, ``position_ids``, ``labels`` (int64 ``[len(rows), longest row]``), no ``attention_mask``.

    Each row holds its examples one after another, ``position_ids`` restarting at 0 at each; an
    example's first label is -100 (no token of it predicts it). Shorter rows are filled with pad
    tokens that form a sequence of their own (positions from 0, labels -100), so no real token
    attends to them. Trailing padding of an example's own ``attention_mask`` is dropped (see
    :func:`can_flatten` for padding inside one).
    """
    if not rows or not all(rows):
        raise ValueError("collate_packed() needs at least one row, each with at least one example")
    if pad_token_id is None:
        raise ValueError("collate_packed() needs a pad_token_id (use the tokenizer's pad or eos token id)")
    cols = []
    for row in rows:
        ids, pos, lab = [], [], []
        for ex in row:
            n = _own_length(ex)
            if not n:
                raise ValueError("an example with padding inside its attention_mask cannot be flattened")
            ids.append(torch.as_tensor(ex["input_ids"][:n], dtype=torch.long))
            pos.append(torch.arange(n, dtype=torch.long))
            lab.append(torch.as_tensor(ex["labels"][:n], dtype=torch.long).clone())
            lab[-1][0] = IGNORE_INDEX
        cols.append((torch.cat(ids), torch.cat(pos), torch.cat(lab)))
    length = max(len(c[0]) for c in cols)
    input_ids = torch.full((len(rows), length), int(pad_token_id), dtype=torch.long)
    position_ids = torch.zeros((len(rows), length), dtype=torch.long)
    labels = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long)
    for r, (ids, pos, lab) in enumerate(cols):
        n = len(ids)
        input_ids[r, :n], position_ids[r, :n], labels[r, :n] = ids, pos, lab
        position_ids[r, n:] = torch.arange(length - n)  # the row's padding: a sequence of its own
    return {"input_ids": input_ids, "position_ids": position_ids, "labels": labels}


def is_flat(batch: dict) -> bool:
    """Whether a collated batch is padding-free / packed (``position_ids``, no ``attention_mask``)."""
    return "position_ids" in batch and "attention_mask" not in batch


def model_inputs(batch: dict) -> dict:
    """Keyword arguments of the model's forward for ``batch``: a flattened batch also gets ``use_cache=False``.

    Needed: with a cache (transformers creates one when ``use_cache`` is on, e.g. in eval mode)
    ``masking_utils`` skips the packed-sequence detection, and the sequences of a row would attend to
    each other. Measured: logits off by O(1) on every tiny family without it."""
    return {**batch, "use_cache": False} if is_flat(batch) else batch


def best_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """Indices of ``lengths`` packed into bins of at most ``capacity`` (best-fit decreasing).

    Longest first (ties in index order); each goes into the open bin with the least room that still
    fits it, else a new bin. Returns the bins in the order they were opened, each in insertion order.
    A length above ``capacity`` gets a bin of its own.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    room: list[tuple[int, int]] = []  # (room left, bin index), sorted
    for i in order:
        n = lengths[i]
        j = bisect.bisect_left(room, (n, -1))
        if j < len(room):
            left, b = room.pop(j)
            bins[b].append(i)
            bisect.insort(room, (left - n, b))
        else:
            bins.append([i])
            bisect.insort(room, (max(capacity - n, 0), len(bins) - 1))
    return bins


def pack_order(order: list[int], lengths: list[int], capacity: int, seed: int, window: int = PACK_WINDOW) -> list[list[int]]:
    """Rows of example indices: ``order`` cut into windows of ``window`` examples, each packed by
    :func:`best_fit_decreasing` into rows of at most ``capacity`` tokens and its rows shuffled by ``seed``
    (so long and short rows mix). A pure function of its arguments."""
    rows = []
    for w, start in enumerate(range(0, len(order), window)):
        part = order[start : start + window]
        bins = best_fit_decreasing([lengths[i] for i in part], capacity)
        g = torch.Generator().manual_seed(seed * 1_000_003 + w)
        rows += [[part[k] for k in bins[j]] for j in torch.randperm(len(bins), generator=g).tolist()]
    return rows


# ------------------------------------------------------------------ which models


def padding_free_support(model) -> tuple[bool, str]:
    """``(True, how)`` where sequences flattened into one row keep their own attention in ``model``, else
    ``(False, why)``: the attention implementation must build its mask from ``position_ids``
    (:data:`PACKED_ATTENTION`), and a probe must find a sequence's logits the same alone and after another
    sequence in the row (:data:`PROBE_TOL`); layers that are not attention (:data:`ATTENTION_LAYER_TYPES`) are refused."""
    base = unwrap(model)
    cfg = base.config
    name = type(base).__name__
    impl = getattr(cfg, "_attn_implementation", None)
    if impl not in PACKED_ATTENTION:
        return False, (f"{name} uses attention implementation {impl!r}, for which transformers builds no packed-sequence "
                       f"mask: sequences flattened into one row would attend to each other "
                       f"(padding-free needs one of {', '.join(PACKED_ATTENTION)})")
    if not getattr(cfg, "is_causal", True):
        return False, f"{name} is not causal: padding-free needs a causal decoder"
    mixing = sorted({t for t in (getattr(cfg, "layer_types", None) or []) if t not in ATTENTION_LAYER_TYPES})
    if mixing or getattr(cfg, "model_type", None) in RECURRENT_MODEL_TYPES:
        what = f"layers of type {', '.join(map(repr, mixing))}" if mixing else f"{cfg.model_type} layers"
        return False, (f"{name} has {what}, which mix tokens along the row whatever the attention mask: "
                       "sequences flattened into one row would leak into each other")
    err = _probe(model)
    tol = PROBE_TOL.get(base.get_input_embeddings().weight.dtype, PROBE_TOL_16BIT)
    if not err <= tol:
        return False, (f"{name} ({impl} attention): a sequence's logits change when another sequence precedes it in a "
                       f"flattened row (relative difference {err:.2g}): its layers mix tokens across sequence boundaries")
    if can_use_packed_sdpa(cfg):  # SDPA without the row's dense mask: one call per sequence (qlora_ga.attention)
        set_attention(model, PACKED_SDPA)
        err_packed = _probe(model)
        if err_packed <= tol:
            return True, (f"{name}, sdpa attention, one call per sequence ({PACKED_SDPA}; probe: {err_packed:.1g} "
                          "relative difference)")
        set_attention(model, impl)  # (not expected: the dense-mask path passed) keep transformers' own
    return True, f"{name}, {impl} attention: block-diagonal by position_ids (probe: {err:.1g} relative difference)"


@torch.no_grad()
def _probe(model) -> float:
    """max |logits of sequence b after sequence a in one row - logits of b alone| / max |logits of b alone|."""
    base = unwrap(model)
    device = base.get_input_embeddings().weight.device
    vocab = base.get_input_embeddings().weight.shape[0]
    g = torch.Generator().manual_seed(0)
    a = torch.randint(min(3, vocab - 1), vocab, (7,), generator=g)
    b = torch.randint(min(3, vocab - 1), vocab, (9,), generator=g)
    was = model.training
    model.eval()
    try:
        ids = torch.cat([a, b])[None].to(device)
        pos = torch.cat([torch.arange(7), torch.arange(9)])[None].to(device)
        flat = model(input_ids=ids, position_ids=pos, use_cache=False).logits[0, 7:].float()
        alone = model(input_ids=b[None].to(device), use_cache=False).logits[0].float()
    finally:
        model.train(was)
    if not torch.isfinite(alone).all():
        return float("inf")
    return float((flat - alone).abs().max()) / max(float(alone.abs().max()), 1e-6)


def collate_padding_free(examples: list[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """One micro-batch without padding: its examples flattened into one row (:func:`collate_packed`). An example
    with padding inside its own ``attention_mask`` keeps the micro-batch padded (:func:`~.batch.collate`)."""
    from .batch import collate

    return collate_packed([list(examples)], pad_token_id) if can_flatten(examples) else collate(examples, pad_token_id)
