"""Step 2 of the pipeline: the serial, block-by-block gradient pass (docs/DESIGN.md section 2).

For every target linear W (m x n) of the 4-bit model, compute the exact mean gradient

    G = dL/dW_hat,   L = (sum of token cross-entropies over all label tokens of the sample) / N_tokens

where W_hat = deQ(Q(W)) is the weight the model really computes with. L is token-weighted over the
whole sample batch, so G does not depend on the micro-batch size or on padding. The backward signal
is that of the summed loss (O(1) per token, in range in fp16 too); G is divided by N in fp32.

How (memory bounded by one decoder block, never by the model):
1. forward the sample micro-batch by micro-batch without grad; forward pre-hooks on the decoder
   layers record each layer's input hidden states (every k-th layer when the store's budget is
   short) and the keyword arguments it was called with (position embeddings, masks);
2. the model's own loss head (whatever the family computes after its last block, run through its own
   forward and checked against it on the first micro-batch; chunked over label tokens; see head.py)
   gives dL/dh at the top;
3. for block l = L-1 ... 0: recompute block l from its stored input with grad, backpropagate the
   incoming dL/dh_{l+1} micro-batch by micro-batch; hooks on each target linear add delta^T x to
   its fp32 G (no dequantized weight copy, no .grad on a 4-bit parameter); pass dL/dh_l down. When
   the block is done, each G is handed to ``reduce_fn`` (a truncated SVD for the inits) and freed.

:func:`gradient_pass` is these steps in order: :func:`_plan_pass` (micro-batches, the state store's
place and stride), :func:`_forward_storing_states` (1-2), then per block :func:`_recompute_segment`,
:func:`_block_backward` and :func:`_reduce_block` (3).

The model is left exactly as it was (hooks removed, requires_grad / training flags restored), also
when the pass fails.
"""

from __future__ import annotations

import contextlib
import math
import time
import weakref
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from . import distributed
from .constants import DEFAULT_TARGETS
from .data import count_label_tokens
from .errors import QloraGaError
from .head import ModelHead
from .model import find_decoder_layers, keep_4bit_trainable, resolve_targets, target_linears


@dataclass
class Factors:
    """Truncated SVD ``G ~= U diag(S) V^T`` of one module's gradient (fp32, CPU)."""

    U: torch.Tensor  # m x k
    S: torch.Tensor  # k
    V: torch.Tensor  # n x k
    shape: tuple[int, int]
    grad_norm: float  # ||G||_F
    svd_seconds: float = 0.0


@dataclass
class PassReport:
    n_sequences: int = 0
    n_label_tokens: int = 0
    n_padded_tokens: int = 0
    n_blocks: int = 0
    loss: float = float("nan")
    seconds: float = 0.0
    state_device: str = ""
    state_stride: int = 1
    state_bytes_per_layer: int = 0
    state_fixed_bytes: int = 0  # kept keyword arguments of the layers (masks, position embeddings), estimated
    reserve_bytes: int = 0  # compute-device memory kept free for the block backward and the loss head
    train_floor_bytes: int = 0  # what a training step at the pass's largest micro-batch needs above the model, at least
    recomputed_blocks: int = 0  # block forwards run once more because the store keeps every k-th layer only
    store_copy_bytes: int = 0  # bytes between the compute device and a store elsewhere (pinned host memory)
    state_buffers: int = 0  # store buffers allocated (each reused once what it held is done)
    peak_live_grad_bytes: int = 0
    max_block_grad_bytes: int = 0
    peak_gpu_bytes: int | None = None
    peak_host_rss_bytes: int | None = None  # the process's peak RSS so far (includes the model itself)
    modules: dict = field(default_factory=dict)  # name -> {"shape", "grad_norm", "top_singular_values", "svd_seconds"}
    # modules whose gradient is exactly zero (nothing of the sample reached them; the inits start them as vanilla LoRA)
    zero_gradient_modules: list = field(default_factory=list)


def has_no_gradient(f) -> bool:
    """Whether a reduced module's gradient was exactly zero (``Factors`` or a start with ``grad_norm``): no direction."""
    S = getattr(f, "S", None)
    return f.grad_norm == 0 or (S is not None and S.numel() > 0 and float(S[0]) == 0)


# ------------------------------------------------------------------ live gradient accounting


class _GradLedger:
    """Counts the bytes of live gradient buffers (freed ones leave via weakref.finalize)."""

    def __init__(self):
        self.live = 0
        self.peak = 0

    def new(self, shape, device) -> torch.Tensor:
        g = torch.zeros(shape, dtype=torch.float32, device=device)
        nbytes = g.numel() * 4
        self.live += nbytes
        self.peak = max(self.peak, self.live)
        weakref.finalize(g, self._free, nbytes)
        return g

    def _free(self, nbytes):
        self.live -= nbytes


def new_grad_buffer(ledger: _GradLedger, shape, device) -> torch.Tensor:
    """Allocate one module's fp32 gradient accumulator (a seam the tests instrument)."""
    return ledger.new(shape, device)


# ------------------------------------------------------------------ SVD


def truncated_svd(G: torch.Tensor, k: int, method: str = "lowrank", niter: int = 4,
                  q: int | None = None) -> tuple[torch.Tensor, ...]:
    """Top-``k`` singular triplets of ``G``: ``(U[:, :k], S[:k], V[:, :k])``.

    ``lowrank``: ``torch.svd_lowrank`` with ``q = min(2k, m, n)`` (= 4r for the 2r vectors LoRA-GA
    needs; ``q`` overrides the 2k, for scripts/bench_svd.py) and ``niter`` power iterations; ``exact``:
    full ``torch.linalg.svd``.

    Signs are canonical: each left singular vector's largest entry (in absolute value) is positive,
    its right vector flipped with it. LoRA-GA pairs u_(r+i) with v_i, so its start would otherwise
    depend on the sign a solver happens to pick (a tiny change in G, e.g. another summation order
    over processes, can flip one).
    """
    m, n = G.shape
    if method == "exact" or min(m, n) <= 2 * k:
        U, S, Vh = torch.linalg.svd(G, full_matrices=False)
        U, S, V = U[:, :k], S[:k], Vh[:k].T
    elif method == "lowrank":
        U, S, V = torch.svd_lowrank(G, q=min(q or 2 * k, m, n), niter=niter)
        U, S, V = U[:, :k], S[:k], V[:, :k]
    else:
        raise QloraGaError(f"unknown SVD method '{method}': use 'lowrank' or 'exact'")
    sign = torch.sign(U.gather(0, U.abs().argmax(0, keepdim=True)))
    sign[sign == 0] = 1
    return U * sign, S, V * sign


def svd_reducer(k: int, method: str = "lowrank", niter: int = 4, transform: Callable | None = None):
    """``reduce_fn`` for :func:`gradient_pass` that keeps the top-``k`` SVD factors of each G (on CPU).

    The randomized SVD draws from a generator seeded by the module's name, so a module's factors
    depend on its G alone (not on which process reduces it, or on what ran before).
    """

    def reduce(name: str, G: torch.Tensor) -> Factors:
        t = time.perf_counter()
        norm = float(torch.linalg.matrix_norm(G))
        target = transform(G) if transform is not None else G
        with torch.random.fork_rng(devices=[G.device] if G.device.type == "cuda" else []):
            torch.manual_seed(zlib.crc32(name.encode()))
            U, S, V = truncated_svd(target, k, method, niter)
        return Factors(U.cpu(), S.cpu(), V.cpu(), tuple(G.shape), norm, time.perf_counter() - t)

    return reduce


# ------------------------------------------------------------------ batching


def make_micro_batches(examples: Sequence[dict], micro_batch_size: int, pad_token_id: int = 0,
                       padding_free: bool = False) -> list[dict]:
    """Sort by length (dynamic padding) and pad on the right per micro-batch (:func:`qlora_ga.data.collate`);
    ``padding_free``: each micro-batch flattened into one row instead (:func:`qlora_ga.data.collate_padding_free`,
    only for a model that supports it: :func:`qlora_ga.data.padding_free_support`).

    Examples are dicts with ``input_ids`` and ``labels`` (lists or 1-D tensors, labels -100 where no
    loss) and optionally ``attention_mask`` (0 = padding already present in the example).
    """
    from .data import collate, collate_padding_free

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


# ------------------------------------------------------------------ state store


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


class _BufferPool:
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


def _move(obj, device: torch.device, seen: dict | None = None):
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
        return type(obj)(_move(o, device, seen) for o in obj)
    if isinstance(obj, dict):
        return {k: _move(v, device, seen) for k, v in obj.items()}
    return obj


# ------------------------------------------------------------------ the pass


class _Capture:
    """Forward pre-hooks that record the decoder layers' inputs and keyword arguments."""

    def __init__(self, layers: nn.ModuleList, keep: set[int], pool: _BufferPool):
        self.layers, self.keep, self.pool = layers, keep, pool
        self.inputs: dict[int, list] = {i: [] for i in range(len(layers))}
        self.kwargs: dict[int, list] = {i: [] for i in range(len(layers))}
        self.handles = [layer.register_forward_pre_hook(self._hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
        self.enabled = True
        self._seen: dict = {}  # this micro-batch's keyword tensors already on the store device (shared by all layers)

    def new_micro_batch(self):
        self._seen = {}

    def _hook(self, i):
        def hook(module, args, kwargs):
            if not self.enabled:
                return None
            hidden = args[0] if args else kwargs["hidden_states"]
            kw = {k: v for k, v in kwargs.items() if k != "hidden_states"}
            kw["use_cache"] = False
            kw.pop("past_key_values", None)
            kw.pop("past_key_value", None)
            # masks and position embeddings live with the store (off the GPU when the store is on the host)
            self.kwargs[i].append(_move((args[1:], kw), self.pool.device, self._seen))
            if i in self.keep:
                self.inputs[i].append(self.pool.store(hidden))
            return None

        return hook

    def remove(self):
        for h in self.handles:
            h.remove()


def _run_block(layer: nn.Module, hidden: torch.Tensor, call) -> torch.Tensor:
    args, kw = _move(call, hidden.device)
    out = layer(hidden, *args, **kw)
    return out[0] if isinstance(out, (tuple, list)) else out


def gradient_pass(
    model: nn.Module,
    examples: Sequence[dict],
    reduce_fn: Callable[[str, torch.Tensor], object],
    *,
    target_modules: str | Sequence[str] = DEFAULT_TARGETS,
    micro_batch_size: int = 8,
    pad_token_id: int = 0,
    padding_free: bool = False,
    state_device: str | None = None,
    state_budget_bytes: int | None = None,
    loss_chunk_bytes: int = 512 << 20,
    progress: bool = True,
    report: PassReport | None = None,
    on_plan: Callable[[PassReport], None] | None = None,
) -> dict[str, object]:
    """Run the serial gradient pass; return ``{module name: reduce_fn(name, G)}``.

    ``examples``: dicts with ``input_ids`` and ``labels`` (-100 = no loss); see :func:`make_micro_batches`.
    ``reduce_fn`` gets each module's exact mean gradient G (fp32, m x n) once its block is done; G is
    freed right after. Module names are the model's own (e.g. ``model.layers.3.mlp.down_proj``).
    ``loss_chunk_bytes``: the loss head goes over label tokens in chunks of this many bytes of logits.
    ``padding_free``: each micro-batch's sequences go through the model flattened into one row (the same G:
    the same token losses; only for a model that :func:`qlora_ga.data.padding_free_support` accepts).
    ``on_plan``: called with the report once the store is planned, before the pass runs (see :func:`describe_plan`).
    """
    report = report if report is not None else PassReport()
    t0 = time.perf_counter()
    setup = _plan_pass(model, examples, target_modules, micro_batch_size, pad_token_id, state_device,
                       state_budget_bytes, loss_chunk_bytes, report, padding_free)
    if on_plan is not None:
        on_plan(report)
    ledger, results = _GradLedger(), {}
    n_layers = len(setup.layers)
    with _frozen(model):
        capture = _Capture(setup.layers, set(range(0, n_layers, setup.stride)), setup.pool)
        try:
            grad_out = _forward_storing_states(model, setup, capture, progress, report)
            with tqdm(total=n_layers, desc="gradient pass: blocks", disable=not progress) as bar:
                for li in reversed(range(n_layers)):
                    _recompute_segment(setup, capture, li)
                    G, grad_out = _block_backward(setup, capture, li, grad_out, ledger)
                    block = _reduce_block(G, setup.n_total, reduce_fn, first=sum(len(b) for b in setup.blocks[li + 1 :]))
                    del G
                    results.update(block)
                    _report_modules(report, block)
                    bar.update(1)
        finally:
            capture.remove()
    _finish_report(report, ledger, setup, t0)
    return results


@dataclass
class _PassSetup:
    """What the pass works on, fixed before it starts (:func:`_plan_pass`)."""

    layers_name: str  # their qualified name (e.g. ``model.layers``)
    layers: nn.ModuleList  # the decoder blocks
    blocks: list[dict[str, nn.Module]]  # per block: {qualified name: target linear}
    device: torch.device  # the compute device
    batches: list[dict]  # this process's micro-batches
    n_total: int  # label tokens of the whole sample (all processes): the mean loss's N
    chunk_tokens: int  # label tokens per chunk of the loss head
    stride: int  # the store keeps every stride-th block's inputs
    pool: _BufferPool  # the state store (its device; pinned host memory when the model is on CUDA)


def _plan_pass(model, examples, target_modules, micro_batch_size, pad_token_id, state_device, state_budget_bytes,
               loss_chunk_bytes, report: PassReport, padding_free: bool = False) -> _PassSetup:
    """Step 1, plan: the blocks' target linears, this process's micro-batches, the state store's place and stride."""
    if len(examples) == 0:
        raise QloraGaError("the gradient sample batch is empty: give --init-samples >= 1 and a non-empty dataset")
    layers_name, layers = find_decoder_layers(model)
    target_modules = resolve_targets(model, target_modules)
    blocks = [target_linears(layer, target_modules, prefix=f"{layers_name}.{i}.") for i, layer in enumerate(layers)]
    if not any(blocks):
        raise QloraGaError(f"no target linears named {list(target_modules)} in the decoder layers: check --target-modules")
    keep_4bit_trainable(model)
    device = next(p for p in layers.parameters()).device
    dtype = model.get_input_embeddings().weight.dtype
    batches, (n_total, n_seq, padded_tokens) = _share_of_sample(examples, micro_batch_size, pad_token_id, padding_free)
    vocab = model.get_output_embeddings().weight.shape[0]
    chunk_tokens = max(1, loss_chunk_bytes // (vocab * (8 + torch.finfo(dtype).bits // 8)))
    plan = plan_pass_memory(model, batches, blocks, dtype, chunk_tokens)
    store_dev, stride = plan_state_store(len(layers), plan, device, state_device, state_budget_bytes)
    pool = _BufferPool(store_dev, pin=store_dev.type == "cpu" and device.type == "cuda")
    report.n_sequences, report.n_label_tokens, report.n_padded_tokens = n_seq, n_total, padded_tokens
    report.n_blocks, report.state_device, report.state_stride = len(layers), str(store_dev), stride
    report.state_bytes_per_layer, report.state_fixed_bytes, report.reserve_bytes = plan.per_layer, plan.fixed, plan.reserve
    report.max_block_grad_bytes = max(sum(m.out_features * m.in_features * 4 for m in b.values()) for b in blocks)
    report.train_floor_bytes = plan.train_floor or 0
    report.recomputed_blocks, copies = store_traffic(len(layers), plan, stride)
    report.store_copy_bytes = copies if store_dev.type != device.type else 0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    return _PassSetup(layers_name, layers, blocks, device, batches, n_total, chunk_tokens, stride, pool)


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


def _share_of_sample(examples, micro_batch_size: int, pad_token_id: int,
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


@contextlib.contextmanager
def _frozen(model: nn.Module):
    """Inside: no parameter requires grad, eval mode. Both are restored on leaving, also on failure."""
    saved_flags = [(p, p.requires_grad) for p in model.parameters()]
    was_training = model.training
    try:
        for p, _ in saved_flags:
            p.requires_grad_(False)
        model.eval()
        yield
    finally:
        for p, flag in saved_flags:
            p.requires_grad_(flag)
        model.train(was_training)


def _forward_storing_states(model, setup: _PassSetup, capture: _Capture, progress: bool, report: PassReport) -> list:
    """Step 2: forward every micro-batch without grad (``capture`` stores the block inputs), then the loss head.

    Returns dL/dh (of the summed loss) at the last block's output, one stored tensor per micro-batch;
    sets ``report.loss`` (the mean over all label tokens) and checks it is finite.
    """
    top_grads, loss_total = [], 0.0
    try:
        with torch.no_grad(), ModelHead(model, setup.layers_name, setup.layers) as head:
            for i, b in enumerate(tqdm(setup.batches, desc="gradient pass: forward", disable=not progress, leave=False)):
                capture.new_micro_batch()
                h_last = head.run(b, setup.device, check=i == 0)  # the first micro-batch checks the head against the model
                g, loss = head.loss_grad(h_last, b["labels"], setup.chunk_tokens)  # of the summed loss
                loss_total += loss
                top_grads.append(setup.pool.store(g))
                del g, h_last
    finally:
        capture.enabled = False
    report.loss = distributed.sum_values(loss_total)[0] / setup.n_total
    if not math.isfinite(report.loss):
        raise QloraGaError(f"the sample loss is not finite ({report.loss}): check the data and the model weights")
    return top_grads


def _recompute_segment(setup: _PassSetup, capture: _Capture, li: int):
    """Step 3a: block ``li``'s inputs. Stored, or (on entering a segment of the strided store) recomputed without
    grad for the whole segment from its stored start, micro-batch by micro-batch."""
    if capture.inputs[li]:
        return
    start = (li // setup.stride) * setup.stride
    with torch.no_grad():
        for mb in range(len(setup.batches)):
            h = capture.inputs[start][mb].to(setup.device, non_blocking=setup.pool.pin)
            for j in range(start, li):
                h = _run_block(setup.layers[j], h, capture.kwargs[j][mb])
                capture.inputs[j + 1].append(setup.pool.store(h))


def _block_backward(setup: _PassSetup, capture: _Capture, li: int, grad_out: list,
                    ledger: _GradLedger) -> tuple[dict[str, torch.Tensor], list]:
    """Step 3b: block ``li`` recomputed with grad and backpropagated micro-batch by micro-batch.

    Returns its target linears' G (of the summed loss; hooks add delta^T x) and dL/dh at its input (the
    next block's ``grad_out``; none below block 0). The incoming dL/dh and the block's inputs go back
    to the store as they are used.
    """
    device, pin, pool = setup.device, setup.pool.pin, setup.pool
    targets = setup.blocks[li]
    G = {name: new_grad_buffer(ledger, (m.out_features, m.in_features), device) for name, m in targets.items()}
    handles = [m.register_forward_hook(_accumulate_hook(G[name])) for name, m in targets.items()]
    new_grad = []
    try:
        for mb in range(len(setup.batches)):
            # x needs grad even for block 0: the 4-bit weights have none, so without it no graph is built
            x = capture.inputs[li][mb].to(device, non_blocking=pin).requires_grad_(True)
            with torch.enable_grad():
                out = _run_block(setup.layers[li], x, capture.kwargs[li][mb])
                go = grad_out[mb].to(device, non_blocking=pin)
                (gx,) = torch.autograd.grad(out, x, go)
            pool.release([grad_out[mb]])  # used: its buffer takes the next store
            grad_out[mb] = None
            if li > 0:
                new_grad.append(pool.store(gx))
            del out, x, gx, go
    finally:
        for h in handles:
            h.remove()
    pool.release(capture.inputs[li])  # this block is done; a segment's stored start is its last block
    capture.inputs[li] = []
    return G, new_grad


def _report_modules(report: PassReport, block: dict[str, object]):
    """Step 4's record: shape, gradient norm, top singular values and SVD time of each reduced module."""
    for name, f in block.items():
        if hasattr(f, "grad_norm") and hasattr(f, "S"):
            report.modules[name] = {
                "shape": list(f.shape), "grad_norm": f.grad_norm,
                "top_singular_values": [round(float(s), 8) for s in f.S[:8]],
                "svd_seconds": round(f.svd_seconds, 4),
            }
            if hasattr(f, "objective_end"):
                report.modules[name]["adam_objective"] = [f.objective_start, f.objective_end]
            if has_no_gradient(f):
                report.zero_gradient_modules.append(name)


def _finish_report(report: PassReport, ledger: _GradLedger, setup: _PassSetup, t0: float):
    """Step 5, after the pass: peak live gradient bytes, store buffers, time, peak GPU memory and host RSS."""
    report.peak_live_grad_bytes = ledger.peak
    order = {n: i for i, n in enumerate(n for block in setup.blocks for n in block)}
    report.zero_gradient_modules.sort(key=lambda n: order.get(n, len(order)))  # the model's order
    report.state_buffers = setup.pool.allocated
    report.seconds = time.perf_counter() - t0
    if setup.device.type == "cuda":
        report.peak_gpu_bytes = int(torch.cuda.max_memory_allocated(setup.device))
    try:
        import resource

        report.peak_host_rss_bytes = int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # KiB on Linux
    except ImportError:  # pragma: no cover - not POSIX
        pass


def _reduce_block(G: dict[str, torch.Tensor], n_total: int, reduce_fn: Callable, first: int) -> dict[str, object]:
    """A finished block's G's -> ``{name: reduce_fn(name, G)}`` on every process.

    One process: scale each G to the mean loss's gradient (in fp32), check it, reduce it. Several:
    module j (counted over the whole pass from ``first``) belongs to process j mod N, which receives
    the sum of every process's partial G, scales, checks and reduces it; the results are then
    exchanged, so every process holds every module's result (and the same error, if one failed).
    """
    owned, error = {}, None
    for j, name in enumerate(list(G), start=first):
        g = G[name]
        owner = j % distributed.world()
        distributed.reduce_to(g, owner)
        if owner != distributed.rank() or error is not None:
            G[name] = g = None  # freed: another process reduces this module
            continue
        try:
            g.mul_(1.0 / n_total)  # the summed loss's gradient -> the mean's, in fp32
            if not torch.isfinite(g).all():
                raise QloraGaError(
                    f"the gradient of {name} is not finite (NaN/inf): check the data, lower --max-length, "
                    "or load the model in a wider compute dtype"
                )
            owned[name] = reduce_fn(name, g)
        except Exception as e:
            if distributed.world() == 1:
                raise
            error = e
        G[name] = g = None
    if distributed.world() == 1:
        return owned
    gathered = distributed.gather_objects((owned, None if error is None else (str(error), isinstance(error, QloraGaError))))
    failed = [(r, e) for r, (_, e) in enumerate(gathered) if e is not None]
    if failed:
        r, (msg, user_error) = failed[0]
        if error is not None and r == distributed.rank() and not user_error:
            raise error
        raise QloraGaError(msg) if user_error else RuntimeError(f"process {r} failed in the gradient pass: {msg}")
    return {name: f for part, _ in gathered for name, f in part.items()}


#: CUDA: 16-bit x^T delta products computed by the GEMM itself in fp32 (``torch.mm(..., out_dtype=float32)``); set
#: False the first time that raises (an older torch or GPU), then the inputs are cast to fp32 as on the CPU
_MM_OUT_FP32 = True


def _add_product(G: torch.Tensor, delta: torch.Tensor, x: torch.Tensor):
    """G += delta^T x in fp32. 16-bit CUDA inputs go through one tensor-core GEMM that accumulates in fp32 and writes
    fp32 (the exact products of the same 16-bit values, summed in fp32, as after casting; without the casts'
    copies and at 16-bit GEMM speed instead of fp32's, which is ~10x slower on an H100); anything else: cast, addmm."""
    global _MM_OUT_FP32
    if _MM_OUT_FP32 and delta.is_cuda and delta.dtype in (torch.bfloat16, torch.float16) and x.dtype == delta.dtype:
        try:
            G.add_(torch.mm(delta.T, x, out_dtype=torch.float32))
            return
        except (RuntimeError, TypeError):
            _MM_OUT_FP32 = False
    G.addmm_(delta.float().T, x.float())


def _accumulate_hook(G: torch.Tensor):
    """Forward hook on a target linear: when its output's gradient delta arrives, G += delta^T x."""

    def hook(module, args, output):
        x = args[0].detach()

        def on_grad(delta):
            _add_product(G, delta.reshape(-1, delta.shape[-1]), x.reshape(-1, x.shape[-1]))

        if output.requires_grad:
            output.register_hook(on_grad)

    return hook


def estimate_factors(
    model: nn.Module,
    examples: Sequence[dict],
    *,
    rank: int,
    target_modules: str | Sequence[str] = DEFAULT_TARGETS,
    n_vectors: int | None = None,
    svd: str = "lowrank",
    niter: int = 4,
    transform: Callable | None = None,
    reducer: Callable | None = None,
    report: PassReport | None = None,
    **pass_kwargs,
) -> dict[str, Factors]:
    """Gradient pass + truncated SVD: ``{module name: Factors}`` with ``n_vectors`` (default 2*rank) triplets.

    ``reducer`` replaces the SVD step (see :func:`qlora_ga.init.factor_reducer`).
    """
    check_rank(model, rank, target_modules, n_vectors or 2 * rank)
    k = n_vectors or 2 * rank
    reduce_fn = reducer or svd_reducer(k, svd, niter, transform)
    return gradient_pass(model, examples, reduce_fn, target_modules=target_modules, report=report, **pass_kwargs)


def check_rank(model: nn.Module, rank: int, target_modules: Sequence[str], needed: int | None = None):
    """Raise a clear error for a rank that is <= 0 or larger than a target layer allows."""
    if not isinstance(rank, int) or rank <= 0:
        raise QloraGaError(f"--rank must be a positive integer, got {rank}")
    needed = needed or rank
    linears = target_linears(model, target_modules)
    if not linears:
        raise QloraGaError(f"no target linears named {list(target_modules)} in the model: check --target-modules")
    name, smallest = min(linears.items(), key=lambda kv: min(kv[1].out_features, kv[1].in_features))
    limit = min(smallest.out_features, smallest.in_features)
    if needed > limit:
        what = f"rank {rank}" if needed == rank else f"rank {rank} (this init needs {needed} singular vectors)"
        raise QloraGaError(
            f"{what} is too large for {name} ({smallest.out_features} x {smallest.in_features}, at most {limit}): lower --rank"
        )
