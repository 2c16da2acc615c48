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
:func:`_block_backward` and :func:`reduce_block` (3).

The model is left exactly as it was (hooks removed, requires_grad / training flags restored), also
when the pass fails.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from .. import distributed
from ..arch import find_decoder_layers, keep_4bit_trainable, resolve_targets, target_linears
from ..constants import DEFAULT_TARGETS
from ..errors import QloraGaError
from .accumulate import GradLedger, accumulate_hook, new_grad_buffer
from .head import ModelHead
from .reduce import reduce_block
from .report import PassReport
from .sample import share_of_sample
from .store import BufferPool, move_to, plan_pass_memory, plan_state_store, store_traffic
from .svd import Factors, check_rank, has_no_gradient, svd_reducer




# ------------------------------------------------------------------ the pass


class _Capture:
    """Forward pre-hooks that record the decoder layers' inputs and keyword arguments."""

    def __init__(self, layers: nn.ModuleList, keep: set[int], pool: BufferPool):
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
            self.kwargs[i].append(move_to((args[1:], kw), self.pool.device, self._seen))
            if i in self.keep:
                self.inputs[i].append(self.pool.store(hidden))
            return None

        return hook

    def remove(self):
        for h in self.handles:
            h.remove()


def _run_block(layer: nn.Module, hidden: torch.Tensor, call) -> torch.Tensor:
    args, kw = move_to(call, hidden.device)
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
    ledger, results = GradLedger(), {}
    n_layers = len(setup.layers)
    with _frozen(model):
        capture = _Capture(setup.layers, set(range(0, n_layers, setup.stride)), setup.pool)
        try:
            grad_out = _forward_storing_states(model, setup, capture, progress, report)
            with tqdm(total=n_layers, desc="gradient pass: blocks", disable=not progress) as bar:
                for li in reversed(range(n_layers)):
                    _recompute_segment(setup, capture, li)
                    G, grad_out = _block_backward(setup, capture, li, grad_out, ledger)
                    block = reduce_block(G, setup.n_total, reduce_fn, first=sum(len(b) for b in setup.blocks[li + 1 :]))
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
    pool: BufferPool  # the state store (its device; pinned host memory when the model is on CUDA)


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
    batches, (n_total, n_seq, padded_tokens) = share_of_sample(examples, micro_batch_size, pad_token_id, padding_free)
    vocab = model.get_output_embeddings().weight.shape[0]
    chunk_tokens = max(1, loss_chunk_bytes // (vocab * (8 + torch.finfo(dtype).bits // 8)))
    plan = plan_pass_memory(model, batches, blocks, dtype, chunk_tokens)
    store_dev, stride = plan_state_store(len(layers), plan, device, state_device, state_budget_bytes)
    pool = BufferPool(store_dev, pin=store_dev.type == "cpu" and device.type == "cuda")
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
                    ledger: GradLedger) -> tuple[dict[str, torch.Tensor], list]:
    """Step 3b: block ``li`` recomputed with grad and backpropagated micro-batch by micro-batch.

    Returns its target linears' G (of the summed loss; hooks add delta^T x) and dL/dh at its input (the
    next block's ``grad_out``; none below block 0). The incoming dL/dh and the block's inputs go back
    to the store as they are used.
    """
    device, pin, pool = setup.device, setup.pool.pin, setup.pool
    targets = setup.blocks[li]
    G = {name: new_grad_buffer(ledger, (m.out_features, m.in_features), device) for name, m in targets.items()}
    handles = [m.register_forward_hook(accumulate_hook(G[name])) for name, m in targets.items()]
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


def _finish_report(report: PassReport, ledger: GradLedger, setup: _PassSetup, t0: float):
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
