"""The state store of the gradient pass: where the blocks' input hidden states live (GPU, pinned host memory,
host memory), at which stride (every k-th layer kept, the rest recomputed), planned from the real model and
sample against the memory a training step needs; and its buffers."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import QloraGaError
from .report import PassReport


def _free_bytes(device: torch.device) -> int:
    """Memory a new allocation can use: on CUDA the driver's free memory plus what PyTorch's caching
    allocator holds unused; on the host the available memory (page cache included, as the kernel counts it)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    import psutil

    return int(psutil.virtual_memory().available)


@dataclass
class StorePlan:
    """What the state store holds, in bytes: ``layers`` hidden-state layers (+1 for dL/dh) and ``fixed`` bytes."""

    per_layer: int  # one layer's hidden states over the whole sample (the dL/dh store is one more)
    fixed: int = 0  # the layers' keyword arguments kept for the backward (masks, position embeddings)
    reserve: int = 0  # compute-device memory the block backward and the loss head need beside the store
    # what a training step at the pass's largest micro-batch needs above the model, at least (None: no yardstick)
    train_floor: int | None = None

    def need(self, n_layers: int, k: int) -> int:
        """Stored every k-th layer + (k-1) recomputed ones for the segment being walked + the dL/dh store + fixed."""
        return (math.ceil(n_layers / k) + (k - 1) + 1) * self.per_layer + self.fixed


#: host memory the state store leaves to everything else: this share of the available memory, at least HOST_MARGIN_MIN
HOST_MARGIN = 0.2
HOST_MARGIN_MIN = 2 << 30


def host_store_budget(compute_device: torch.device, reserve: int = 0) -> int:
    """Bytes of host memory the state store may take: the available memory less a margin (HOST_MARGIN of it, at
    least HOST_MARGIN_MIN) and, when the host also computes, less the pass's working ``reserve``."""
    free = _free_bytes(torch.device("cpu"))
    return free - max(HOST_MARGIN_MIN, int(free * HOST_MARGIN)) - (reserve if compute_device.type == "cpu" else 0)


def plan_state_store(n_layers: int, plan: StorePlan, compute_device: torch.device,
                     state_device: str | None = None, budget_bytes: int | None = None) -> tuple[torch.device, int]:
    """Choose where block inputs live and the stride k (keep every k-th layer's inputs).

    Default on a GPU (``plan.train_floor`` set, no override): the pass's GPU peak stays within what a training
    step at the same micro-batch needs, so the store goes to the GPU only if all of it fits
    ``min(free, train_floor) - reserve``; else to pinned host memory at the smallest stride that fits
    :func:`host_store_budget`; else back to the GPU at the smallest stride within that room. On the host
    (a CPU run): :func:`host_store_budget`. ``state_device`` / ``budget_bytes`` override the choice (a budget
    is for the store alone): the first device on which some k fits ``budget_bytes``, or the GPU's free
    memory less the reserve, then the host.
    """
    host = torch.device("cpu")
    if state_device is None and budget_bytes is None and compute_device.type != "cpu" and plan.train_floor is not None:
        room = min(int(_free_bytes(compute_device) * 0.95), plan.train_floor) - plan.reserve
        host_budget = host_store_budget(compute_device)
        for dev, budget, strides in ((compute_device, room, (1,)), (host, host_budget, range(1, n_layers + 1)),
                                     (compute_device, room, range(2, n_layers + 1))):
            for k in strides:
                if plan.need(n_layers, k) <= budget:
                    return dev, k
        raise QloraGaError(
            f"the gradient sample's hidden states ({plan.per_layer / 2**20:.2f} MiB per layer) fit neither host memory "
            f"({max(host_budget, 0) / 2**30:.1f} GiB free for them) nor the GPU beside the pass even with "
            "recomputation: lower --init-samples or --max-length")
    candidates = [torch.device(state_device)] if state_device is not None else \
        [compute_device] + ([host] if compute_device.type != "cpu" else [])
    for dev in candidates:
        budget = budget_bytes
        if budget is None:
            budget = int(_free_bytes(dev) * 0.95) - plan.reserve if dev.type == "cuda" else \
                host_store_budget(compute_device, plan.reserve)
        for k in range(1, n_layers + 1):
            if plan.need(n_layers, k) <= budget:
                return dev, k
    raise QloraGaError(
        f"the gradient sample's hidden states ({plan.per_layer / 2**20:.2f} MiB per layer) do not fit the state "
        "budget even with recomputation: lower --init-samples or --max-length"
    )


def store_traffic(n_layers: int, plan: StorePlan, k: int) -> tuple[int, int]:
    """(block forwards recomputed, bytes copied between the store and the compute device when they differ) of
    a pass with stride ``k``: every stored layer input and every dL/dh goes out once and comes back once; a
    stride recomputes the k-1 blocks after each stored one, from its stored start."""
    kept = math.ceil(n_layers / k)
    recomputed = n_layers - kept
    copies = (2 * n_layers + 2 * n_layers + (kept if k > 1 else 0)) * plan.per_layer
    return recomputed, copies


def plan_pass_memory(model: nn.Module, batches: list[dict], blocks: list[dict], dtype: torch.dtype,
                     head_chunk_tokens: int) -> StorePlan:
    """Bytes of the state store, of the compute-device reserve and of a training step's floor, from the real
    model and sample.

    Store: one layer's hidden states (padded tokens x hidden); the kept keyword arguments of every
    micro-batch (two B x T x T masks at most, e.g. sliding + full attention, and the rotary cos/sin).
    Reserve: the largest block's fp32 G, one micro-batch's activations through one block with grad,
    and one chunk of the loss head (fp32 logits, their softmax gradient, the head's output; a chunk holds
    one micro-batch's label tokens at most).
    Training floor (a lower bound on what a gradient-checkpointed training step at the largest micro-batch
    needs above the model): every layer's checkpointed input, one block's activations recomputed with grad
    (the smallest set a decoder block saves: its norms' and projections' outputs, not the attention scores),
    and the logits with the fp32 copy and log-softmax the loss keeps (a fused loss head such as Liger's
    keeps less: the floor then overstates the step).
    """
    cfg = model.config
    elem = torch.finfo(dtype).bits // 8
    hidden = cfg.hidden_size
    heads = getattr(cfg, "num_attention_heads", 1) or 1
    head_dim = getattr(cfg, "head_dim", None) or hidden // heads
    inter = getattr(cfg, "intermediate_size", None) or 4 * hidden
    shapes = [tuple(b["input_ids"].shape) for b in batches]
    per_layer = sum(B * T for B, T in shapes) * hidden * elem
    fixed = sum(2 * B * T * T * elem + 2 * B * T * head_dim * 4 for B, T in shapes)
    B, T = max(shapes, key=lambda s: s[0] * s[1])
    block_work = B * T * (8 * hidden + 4 * inter) * elem + B * heads * T * T * elem
    vocab = model.get_output_embeddings().weight.shape[0]
    head = min(head_chunk_tokens, B * T) * vocab * (4 + 4 + elem)  # the head goes over one micro-batch at a time
    grads = max(sum(m.out_features * m.in_features * 4 for m in blk.values()) for blk in blocks)
    n_layers = len(blocks)
    train_floor = B * T * (n_layers * hidden * elem + (4 * hidden + 3 * inter) * elem + vocab * (elem + 8))
    return StorePlan(per_layer=per_layer, fixed=fixed, reserve=grads + block_work + head, train_floor=train_floor)


class BufferPool:
    """The state store's buffers, reused by shape and dtype (pinning host memory is slow: pin each buffer once).

    ``store(t)`` copies ``t`` into a free buffer of its shape (a new one when none is free);
    ``release(buffers)`` gives buffers back once what they hold is no longer needed.
    """

    def __init__(self, device: torch.device, pin: bool):
        self.device, self.pin = device, pin
        self.free: dict[tuple, list[torch.Tensor]] = {}
        self.allocated = 0  # buffers created over the pass

    def store(self, t: torch.Tensor) -> torch.Tensor:
        t = t.detach()
        bucket = self.free.get((tuple(t.shape), t.dtype))
        if bucket:
            out = bucket.pop()
        else:
            out = torch.empty(t.shape, dtype=t.dtype, device=self.device, pin_memory=self.pin)
            self.allocated += 1
        out.copy_(t, non_blocking=self.pin)
        return out

    def release(self, buffers):
        for b in buffers:
            if b is not None:
                self.free.setdefault((tuple(b.shape), b.dtype), []).append(b)


def move_to(obj, device: torch.device, seen: dict | None = None):
    """``obj`` (tensors, possibly inside tuples/lists/dicts) on ``device``; ``seen`` shares one copy per tensor."""
    if isinstance(obj, torch.Tensor):
        if obj.device == device:
            return obj
        if seen is not None and id(obj) in seen:
            return seen[id(obj)][1]
        out = obj.to(device)
        if seen is not None:
            seen[id(obj)] = (obj, out)  # keep obj alive so its id is not reused within this micro-batch
        return out
    if isinstance(obj, (tuple, list)):
        return type(obj)(move_to(o, device, seen) for o in obj)
    if isinstance(obj, dict):
        return {k: move_to(v, device, seen) for k, v in obj.items()}
    return obj


def describe_plan(report: PassReport, compute_device: str) -> str:
    """One line: where the state store is, its stride and size, what it costs, and the pass's working memory on the
    compute device against a training step's floor."""
    gib = 2**30
    n, k = report.n_blocks, report.state_stride
    size = StorePlan(report.state_bytes_per_layer, report.state_fixed_bytes).need(n, k)
    on_host = report.state_device == "cpu"
    where = ("pinned host memory" if compute_device.startswith("cuda") else "host memory") if on_host else \
        f"GPU memory of {report.state_device}"
    kept = "every layer's inputs" if k == 1 else f"the inputs of one layer in {k}"
    cost = [f"{report.recomputed_blocks} recomputed block forwards"] if report.recomputed_blocks else []
    if report.store_copy_bytes:
        cost.append(f"{report.store_copy_bytes / gib:.2f} GiB of copies to and from the GPU")
    line = f"gradient pass plan: {kept} in {where} ({size / gib:.2f} GiB)" + (f", at the cost of {' and '.join(cost)}" if cost else "")
    if compute_device.startswith("cuda") and report.train_floor_bytes:
        on_gpu = report.reserve_bytes + (size if report.state_device != "cpu" else 0)
        line += (f"; on the GPU ~{on_gpu / gib:.2f} GiB above the model, a training step at the same micro-batch "
                 f">= {report.train_floor_bytes / gib:.2f} GiB")
    return line
