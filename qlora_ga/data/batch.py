"""Batches: the gradient-pass sample, right-padded micro-batches of tokenized examples, their label-token count."""

from __future__ import annotations

import random

import torch

from ..constants import IGNORE_INDEX


def sample_batch(examples: list[dict], n: int, seed: int) -> list[dict]:
    """The gradient-pass sample: ``n`` examples drawn without replacement by ``seed`` (all, in
    their order, if ``n >= len(examples)``)."""
    if n >= len(examples):
        return list(examples)
    if n < 0:
        raise ValueError(f"sample_batch() needs n >= 0, got {n}")
    return random.Random(seed).sample(list(examples), n)


def count_label_tokens(labels: torch.Tensor) -> int:
    """Label tokens of a collated batch that get a loss in a causal LM (position t predicts labels[:, t+1])."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


def collate(examples: list[dict], pad_token_id: int, pad_to_multiple_of: int | None = None) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example (rounded up to ``pad_to_multiple_of``): ``input_ids`` (pad
    id), ``attention_mask`` (0 on pad), ``labels`` (-100 on pad); all int64 ``[batch, length]``.

    An example may carry its own ``attention_mask`` (0 = padding already inside it): it is kept,
    and those positions get no loss either.

    Not DataCollatorForSeq2Seq: it needs a tokenizer with a pad token (callers hold a pad id) and keeps labels under own mask 0s."""
    if not examples:
        raise ValueError("collate() needs at least one example")
    if pad_token_id is None:
        raise ValueError("collate() needs a pad_token_id (use the tokenizer's pad or eos token id)")
    length = max(len(ex["input_ids"]) for ex in examples)
    if pad_to_multiple_of:
        length = -(-length // pad_to_multiple_of) * pad_to_multiple_of
    input_ids = torch.full((len(examples), length), int(pad_token_id), dtype=torch.long)
    attention_mask = torch.zeros((len(examples), length), dtype=torch.long)
    labels = torch.full((len(examples), length), IGNORE_INDEX, dtype=torch.long)
    for row, ex in enumerate(examples):
        n = len(ex["input_ids"])
        input_ids[row, :n] = torch.as_tensor(ex["input_ids"], dtype=torch.long)
        mask = torch.as_tensor(ex["attention_mask"], dtype=torch.long) if "attention_mask" in ex else 1
        attention_mask[row, :n] = mask
        labels[row, :n] = torch.as_tensor(ex["labels"], dtype=torch.long).masked_fill(attention_mask[row, :n] == 0, IGNORE_INDEX)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
