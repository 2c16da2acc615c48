"""The gradient sample in micro-batches: each process's share, sorted by length, padded or flattened."""

from __future__ import annotations

from collections.abc import Sequence

from .. import distributed
from ..data import count_label_tokens
from ..errors import QloraGaError


def make_micro_batches(examples: Sequence[dict], micro_batch_size: int, pad_token_id: int = 0,
                       padding_free: bool = False) -> list[dict]:
    """Sort by length (dynamic padding) and pad on the right per micro-batch (:func:`qlora_ga.data.collate`);
    ``padding_free``: each micro-batch flattened into one row instead (:func:`qlora_ga.data.collate_padding_free`,
    only for a model that supports it: :func:`qlora_ga.data.padding_free_support`).

    Examples are dicts with ``input_ids`` and ``labels`` (lists or 1-D tensors, labels -100 where no
    loss) and optionally ``attention_mask`` (0 = padding already present in the example).
    """
    from ..data import collate, collate_padding_free

    if padding_free:
        collate = collate_padding_free  # noqa: F811 - same sequences per micro-batch, no padding

    if micro_batch_size < 1:
        raise QloraGaError(f"micro-batch size must be >= 1, got {micro_batch_size}")
    _check_examples(examples)
    rows = sorted(examples, key=lambda ex: -len(ex["input_ids"]))
    return [collate(rows[i : i + micro_batch_size], pad_token_id) for i in range(0, len(rows), micro_batch_size)]


def _check_examples(examples: Sequence[dict]):
    for ex in examples:
        lengths = {len(ex[k]) for k in ("input_ids", "labels", "attention_mask") if k in ex}
        if len(lengths) != 1 or "labels" not in ex:
            raise QloraGaError("every example needs input_ids and labels of the same length (and attention_mask, if any): fix the data collation")


def split_sample(examples: Sequence[dict], world: int, rank: int) -> list[dict]:
    """Process ``rank``'s share of the gradient sample: sequences ``rank, rank + world, ...`` of the length-sorted sample.

    Every process gets ``floor`` or ``ceil(len(examples) / world)`` sequences of a like spread of lengths, whatever
    the micro-batch size (each process then makes its own micro-batches of at most that size); fewer sequences
    than processes is an error. With one process: the whole sample.
    """
    if len(examples) < world:
        raise QloraGaError(f"the gradient sample has {len(examples)} sequences for {world} processes: "
                           f"raise --init-samples to at least {world}")
    rows = sorted(examples, key=lambda ex: -len(ex["input_ids"]))  # stable: ties keep the sample's order
    return rows[rank::world]


def share_of_sample(examples, micro_batch_size: int, pad_token_id: int,
                     padding_free: bool = False) -> tuple[list[dict], tuple[int, int, int]]:
    """This process's micro-batches (of its :func:`split_sample` share), and (label tokens, sequences, padded tokens)
    over all processes."""
    if micro_batch_size < 1:
        raise QloraGaError(f"micro-batch size must be >= 1, got {micro_batch_size}")
    _check_examples(examples)  # all of them, on every process: the same error everywhere
    share = split_sample(examples, distributed.world(), distributed.rank())
    batches = make_micro_batches(share, micro_batch_size, pad_token_id, padding_free)
    counts = tuple(int(v) for v in distributed.sum_values(
        sum(count_label_tokens(b["labels"]) for b in batches), len(share),
        sum(b["input_ids"].numel() for b in batches)))
    if counts[0] == 0:
        raise QloraGaError("the gradient sample batch has no label tokens (every token is masked): check the data format and prompt masking")
    return batches, counts
