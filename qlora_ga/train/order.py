"""Which sequences each optimizer step trains on: a pure function of (data, seed, step), so a resumed run needs no
data cursor; the run's length in steps; the loader that collates the next steps while one trains."""

from __future__ import annotations

import math
import os

import torch

from .. import distributed
from ..data.batch import collate, count_label_tokens
from ..config import TrainSettings


def total_steps(n_train: int, s: TrainSettings, world: int = 1, train: list[dict] | None = None) -> int:
    """Optimizer steps of the run; each takes ``batch_size * grad_accum * world`` sequences (``world`` processes),
    or as many packed rows with ``s.packing`` (then ``train``, the examples, gives the first epoch's row count)."""
    if s.max_steps >= 0:
        return s.max_steps
    if s.packing:
        if train is None:
            raise ValueError("total_steps() with packing needs the training examples")
        n_train = len(StepBatches(train, s, world=world).packed_rows(0))
    per_epoch = math.ceil(n_train / (s.batch_size * s.grad_accum * world))
    return max(1, math.ceil(s.epochs * per_epoch))


def warmup_steps(total: int, warmup: float) -> int:
    return int(round(warmup * total)) if warmup < 1 else int(warmup)


#: --group-by-length sorts the sequences of each chunk of this many micro-batches by length
#: (transformers' LengthGroupedSampler uses the same 50)
LENGTH_GROUP_MICRO_BATCHES = 50


def epoch_order(n: int, seed: int, epoch: int, lengths: list[int] | None = None, group: int = 0) -> list[int]:
    """The example order of ``epoch``: a seeded permutation; with ``lengths``, each run of ``group``
    consecutive examples of it sorted by length, longest first (so a micro-batch holds similar lengths)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(n, generator=g).tolist()
    if lengths is None:
        return order
    return [i for j in range(0, n, group) for i in sorted(order[j : j + group], key=lambda i: -lengths[i])]


class StepBatches(torch.utils.data.Dataset):
    """Item ``step``: this process's collated micro-batches of optimizer step ``step`` and the token counts.

    A pure function of (data, seed, step), so a resumed run needs no data cursor; each epoch's order
    is computed once (the last two are kept: a step may straddle an epoch boundary). Indexed by a
    ``DataLoader``, whose workers collate the next steps while the current one trains. With ``world``
    processes a step takes ``grad_accum * world`` micro-batches; process ``rank`` trains on every
    ``world``-th of them, and the step's label-token count (the loss's weight) is the whole step's.

    ``flat``: each micro-batch is flattened into one row without padding (``data.packing``; only for a
    model that supports it, see ``padding_free_support``). With ``s.packing`` a micro-batch is
    ``batch_size`` rows of whole sequences, at most ``max_length`` tokens each: each epoch's seeded order
    is packed (``data.packing.pack_order``) and step ``t`` takes rows ``t * batch_size * grad_accum * world``
    onwards, counted over the epochs, so the order stays a pure function of (data, seed, step).
    """

    def __init__(self, train: list[dict], s: TrainSettings, pad_token_id: int | None = None, rank: int = 0, world: int = 1,
                 flat: bool = False):
        self.train, self.s, self.pad, self.rank, self.world, self.flat = train, s, pad_token_id, rank, world, flat
        self.lengths = [len(ex["input_ids"]) for ex in train] if s.group_by_length or s.packing else None
        self._orders: dict[int, list[int]] = {}
        self._rows: dict[int, list[list[int]]] = {}  # packing: each epoch's rows (example indices)
        self._row_counts: list[int] = []  # packing: rows of epochs 0, 1, ...

    def order(self, epoch: int) -> list[int]:
        if epoch not in self._orders:
            self._orders = {e: o for e, o in self._orders.items() if e >= epoch - 1}
            self._orders[epoch] = epoch_order(len(self.train), self.s.seed, epoch,
                                              self.lengths if self.s.group_by_length else None,
                                              LENGTH_GROUP_MICRO_BATCHES * self.s.batch_size)
        return self._orders[epoch]

    def packed_rows(self, epoch: int) -> list[list[int]]:
        """Packing: the rows of ``epoch`` (example indices; best-fit decreasing over windows of its order)."""
        from ..data.packing import pack_order

        if epoch not in self._rows:
            self._rows = {e: r for e, r in self._rows.items() if e >= epoch - 1}
            self._rows[epoch] = pack_order(self.order(epoch), self.lengths, self.s.max_length, self.s.seed * 1_000_003 + epoch)
        return self._rows[epoch]

    def _row(self, k: int) -> list[dict]:
        """Packing: global row ``k``, counted over the epochs."""
        epoch = 0
        while True:
            if epoch == len(self._row_counts):
                self._row_counts.append(len(self.packed_rows(epoch)))
            if k < self._row_counts[epoch]:
                return [self.train[i] for i in self.packed_rows(epoch)[k]]
            k -= self._row_counts[epoch]
            epoch += 1

    def examples(self, step: int) -> list[list[dict]]:
        """All micro-batches of the step (every process's); with packing, each a list of rows (lists of examples)."""
        per_step = self.s.batch_size * self.s.grad_accum * self.world
        if self.s.packing:
            rows = [self._row(k) for k in range(step * per_step, (step + 1) * per_step)]
            return [rows[j : j + self.s.batch_size] for j in range(0, per_step, self.s.batch_size)]
        out = []
        for k in range(step * per_step, (step + 1) * per_step):
            epoch, i = divmod(k, len(self.train))
            out.append(self.train[self.order(epoch)[i]])
        return [out[j : j + self.s.batch_size] for j in range(0, per_step, self.s.batch_size)]

    def collate(self, mb: list) -> dict[str, torch.Tensor]:
        """One micro-batch: packed rows, one padding-free row, or padded (as the settings and the model allow)."""
        from ..data.packing import collate_packed, collate_padding_free

        if self.s.packing:
            return collate_packed(mb, self.pad)
        return collate_padding_free(mb, self.pad) if self.flat else collate(mb, self.pad)

    def __getitem__(self, step: int) -> dict:
        examples = self.examples(step)
        every = [self.collate(mb) for mb in examples]  # (cheap, on the host) for the counts
        mbs = every[self.rank :: self.world]
        seqs = [ex for mb in examples for ex in (sum(mb, []) if self.s.packing else mb)]
        return {"micro_batches": mbs,
                "label_tokens": [count_label_tokens(b["labels"]) for b in mbs],
                "step_label_tokens": sum(count_label_tokens(b["labels"]) for b in every),  # the loss's weight
                "input_tokens": sum(_real_tokens(ex) for ex in seqs),  # useful (non-pad) tokens
                "computed_tokens": sum(b["input_ids"].numel() for b in every)}  # what the model runs, padding included


def _real_tokens(ex: dict) -> int:
    return int(sum(ex["attention_mask"])) if "attention_mask" in ex else len(ex["input_ids"])


def micro_batches_for_step(train: list[dict], step: int, s: TrainSettings) -> list[list[dict]]:
    """The micro-batches of optimizer step ``step``: a pure function of (data, seed, step) — resume needs no cursor."""
    return StepBatches(train, s).examples(step)


def step_loader(train: list[dict], s: TrainSettings, pad_token_id: int, start_step: int, steps: int, device: torch.device,
                flat: bool = False):
    """Steps ``start_step .. steps-1`` through a ``DataLoader``: on CUDA two worker processes collate
    ahead into pinned memory; on CPU the main process does it (workers would only compete for the cores).
    ``flat``: padding-free micro-batches (see :class:`StepBatches`)."""
    cuda = device.type == "cuda"
    workers = s.num_workers if s.num_workers is not None else (min(2, os.cpu_count() or 1) if cuda else 0)
    data = StepBatches(train, s, pad_token_id, distributed.rank(), distributed.world(), flat=flat)
    # its own generator: creating the iterator draws a seed, which must not move the global RNG (exact resume)
    return torch.utils.data.DataLoader(data, batch_size=None,
                                       sampler=range(start_step, steps), num_workers=workers, pin_memory=cuda,
                                       generator=torch.Generator().manual_seed(s.seed))
