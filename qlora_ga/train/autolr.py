"""``--lr auto``: the learning rate from the initialised adapters, by a line search along Adam's first step.

Between init and training (docs/DESIGN.md section 5). On the sequences of the first optimizer step:

1. one forward + backward gives the adapters' gradient ``g``; Adam's first (bias-corrected) update is
   ``-lr * u`` with ``u = g / (|g| + eps)``, about ``-lr * sign(g)``, whatever the init's scale;
2. the loss along that update, ``L(theta - eta * u)``, is evaluated (forward passes only) at ``eta``
   spaced by factors of 2 from the method's default lr, moving up or down until the middle of three
   points is the lowest, and the minimiser ``eta*`` is read off a parabola in ``log eta`` (then a second
   one at half the spacing);
3. ``lr = LR_FACTOR * eta*``, whatever the run's length. A shrink for longer runs (``(50 / steps) ** 0.39``,
   read off 300-step grids run at twice the batch, vanilla LoRA's best at the top of its grid) was
   measured at 100 steps and dropped: there both inits did better above the shrunk lr (RESULTS.md
   section 8.1).

The adapters are restored bit for bit afterwards. ``eta*`` moves with what sets each method's best lr:
vanilla LoRA's (B = 0, a small random A) is about 10x LoRA-GA's (unit singular vectors, stable scale).
``LR_FACTOR`` is measured, not derived (docs/RESULTS.md section 8.1): from the 50-step optima of
vanilla LoRA and LoRA-GA. Cost: one forward + backward and 5-10 forward passes on one step's
sequences, 6-11% of a 50-step run on the CPU benchmark. Weight decay is left out of the direction
(AdamW's first step adds ``-lr * wd * theta``; the default wd is 0).

Nothing non-finite passes silently: a non-finite loss at the init, a non-finite gradient, or a loss that is
non-finite at every step tried stops the search with one line (use a wider compute dtype, or pass ``--lr``).
In fp16 the probe's backward is loss-scaled like training's GradScaler: its summed loss is scaled down by
``SCALE_BACKOFF`` after each overflow (down to ``MIN_SCALE``) and the gradient unscaled in fp32; the scale
used is recorded (``loss_scale``).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field

import torch

from ..data.batch import collate, count_label_tokens
from ..errors import QloraGaError
from ..model import autocast
from .runtime import checkpointing

#: lr = LR_FACTOR * eta* (measured: RESULTS.md section 8.1)
LR_FACTOR = 1.8
#: the rule's version, recorded with every search: 2 = LR_FACTOR x eta* at any run length (1 also shrank the lr for
#: runs longer than 50 steps by (50 / steps) ** 0.39; dropped after the 100-step check, RESULTS.md section 8.1)
RULE_VERSION = 2
#: Adam's epsilon (torch and bitsandbytes default)
ADAM_EPS = 1e-8
#: most loss evaluations of the search (2**MAX_POINTS spans ~6 decades of eta from the start)
MAX_POINTS = 20
#: fp16: after an overflow in the probe's backward, its loss scale is multiplied by this ...
SCALE_BACKOFF = 2.0**-4
#: ... down to this (below it the gradient is reported as not finite)
MIN_SCALE = 2.0**-24


@dataclass
class LrSearch:
    """What ``--lr auto`` found (written to ``lr_search.json``)."""

    lr: float  # the learning rate chosen
    eta: float  # eta*: the step along Adam's first update that minimises the loss
    factor: float  # lr / eta* (LR_FACTOR)
    steps: int  # the run's optimizer steps (recorded; the lr does not depend on it)
    loss_start: float  # loss of the probe sequences at the init
    loss_at_eta: float  # ... after the step eta* (interpolated on the parabola)
    sequences: int
    label_tokens: int
    points: list[list[float]] = field(default_factory=list)  # [eta, loss] evaluated, in order
    seconds: float = 0.0
    loss_scale: float = 1.0  # the probe's backward ran on the summed loss times this (< 1 after an fp16 overflow)
    rule_version: int = RULE_VERSION  # which rule found it (RULE_VERSION)

    def as_dict(self) -> dict:
        return asdict(self)

    def line(self) -> str:
        return (f"lr auto: {self.lr:.3g} = {self.factor:.3g} x {self.eta:.3g}, the step along Adam's first update that "
                f"minimises the loss of the first step's {self.sequences} sequences ({self.loss_start:.4f} -> "
                f"{self.loss_at_eta:.4f}); {len(self.points)} forward passes, {self.seconds:.1f} s"
                + (f"; gradient at loss scale 2^{math.log2(self.loss_scale):.0f} (fp16 overflow)" if self.loss_scale < 1 else ""))


def _hint(fp16: bool) -> str:
    what = "use --compute-dtype bf16 or fp32" if fp16 else "check the data and the model weights"
    return f": {what}, or pass --lr NUMBER"


def _probe_gradient(model, batches, counts, params, device, compute_dtype, fp16: bool):
    """``(summed token loss, [summed loss's gradient of each param, fp32], loss scale)`` at the current adapters.

    One forward + backward per micro-batch of the summed token loss (O(1) per token). In fp16 a backward
    that overflows is redone with the loss scaled down (``SCALE_BACKOFF``, as GradScaler backs off; the
    scale stays down for the next micro-batches) and the gradient is unscaled in fp32. A non-finite loss,
    or a gradient still not finite (at ``MIN_SCALE`` in fp16), raises :class:`QloraGaError`.
    """
    total = [torch.zeros(p.shape, dtype=torch.float32, device=p.device) for p in params]
    loss_sum, scale = 0.0, 1.0
    for b, n in zip(batches, counts):
        while True:
            for p in params:
                p.grad = None
            with autocast(device, compute_dtype):
                loss = model(**b).loss.float() * n  # the summed token loss: O(1) per token, no fp16 underflow
            if not torch.isfinite(loss):
                raise QloraGaError(f"--lr auto: the loss of the first step's sequences is not finite at the init "
                                   f"({loss.item()}){' in fp16' if fp16 else ''}{_hint(fp16)}")
            (loss * scale).backward()
            grads = [p.grad for p in params if p.grad is not None]
            if not grads or bool(torch.stack([torch.isfinite(g).all() for g in grads]).all()):  # one sync
                break
            if not fp16 or scale * SCALE_BACKOFF < MIN_SCALE:
                scaled = f" even with the loss scaled by 2^{math.log2(scale):.0f}" if fp16 else ""
                raise QloraGaError(f"--lr auto: the adapters' gradient on the first step's sequences is not finite "
                                   f"(NaN/inf) at the init{scaled}{_hint(fp16)}")
            scale *= SCALE_BACKOFF
        for t, p in zip(total, params):
            if p.grad is not None:
                t.add_(p.grad.float() if scale == 1 else p.grad.float() / scale)
        loss_sum += loss.item()
    return loss_sum, total, scale


def _vertex(lo: float, mid: float, hi: float) -> tuple[float, float]:
    """(x, y) of the lowest point of the parabola through (-1, lo), (0, mid), (1, hi), x within [-1, 1];
    (0, mid) when it has no finite minimum there."""
    curv = hi - 2 * mid + lo
    if not (math.isfinite(lo) and math.isfinite(hi)) or curv <= 0:
        return 0.0, mid
    x = max(-1.0, min(1.0, 0.5 * (lo - hi) / curv))
    return x, mid + 0.5 * (hi - lo) * x + 0.5 * curv * x * x


def find_lr(model, examples: list[dict], pad_token_id: int, *, start: float, steps: int, batch_size: int,
            compute_dtype: torch.dtype = torch.float32, gradient_checkpointing: bool = False,
            factor: float = LR_FACTOR) -> LrSearch:
    """The ``--lr auto`` learning rate of ``model``'s trainable adapters (see the module docstring).

    ``examples``: the first optimizer step's sequences, in micro-batches of ``batch_size``; ``start``:
    where the search starts (the method's default lr); ``steps``: the run's optimizer steps (only
    recorded in the result: the lr does not depend on it);
    ``gradient_checkpointing``: for the one backward, as training would (dropout is off throughout).
    """
    t0 = time.perf_counter()
    params = [p for p in model.parameters() if p.requires_grad]
    fp16 = compute_dtype == torch.float16 or any(p.dtype == torch.float16 for p in model.parameters())
    device = params[0].device
    batches = [collate(examples[i : i + batch_size], pad_token_id) for i in range(0, len(examples), batch_size)]
    counts = [count_label_tokens(b["labels"]) for b in batches]
    batches = [{k: v.to(device) for k, v in b.items()} for b, n in zip(batches, counts) if n]
    counts = [n for n in counts if n]
    n_tok = sum(counts)
    if not n_tok:
        raise QloraGaError("--lr auto: the first step's sequences have no label tokens: check the data, or pass --lr")
    was_training = model.training
    saved = [p.detach().clone() for p in params]
    grads = [p.grad for p in params]
    try:
        for p in params:
            p.grad = None
        if gradient_checkpointing:  # transformers checkpoints only in training mode: train mode, dropout off
            model.train()
            for m in model.modules():
                if isinstance(m, torch.nn.Dropout):
                    m.eval()
            checkpointing(model, True)
        else:
            model.eval()
        loss0, total, scale = _probe_gradient(model, batches, counts, params, device, compute_dtype, fp16)
        loss0 /= n_tok
        model.eval()  # no dropout: the same loss function at every eta
        # Adam's first step direction (bias-corrected m / sqrt(v) = g / |g|), from the mean gradient
        direction = [((t / n_tok) / ((t / n_tok).abs() + ADAM_EPS)).to(p.dtype) for t, p in zip(total, params)]
        del total
        if not any(bool(d.any()) for d in direction):
            raise QloraGaError("--lr auto: the adapters get no gradient on the first step's sequences: pass --lr")

        points: dict[float, float] = {}  # eta -> the loss after Adam's first step of that size
        f = _loss_along(model, params, saved, direction, batches, counts, n_tok, device, compute_dtype, points, start)
        eta_star, at = _search(f, start, points, loss0, fp16)
    finally:
        if gradient_checkpointing:
            checkpointing(model, False)
        with torch.no_grad():
            for p, p0, g in zip(params, saved, grads):
                p.copy_(p0)
                p.grad = g
        model.train(was_training)
    return LrSearch(lr=float(f"{factor * eta_star:.4g}"), eta=eta_star, factor=factor, steps=steps,
                    loss_start=loss0, loss_at_eta=at, sequences=len(examples), label_tokens=n_tok,
                    points=[[e, y] for e, y in points.items()], seconds=round(time.perf_counter() - t0, 2),
                    loss_scale=scale)


def _loss_along(model, params, saved, direction, batches, counts, n_tok: int, device, compute_dtype, points: dict,
                start: float):
    """``f(eta)``: the mean loss of the first step's sequences after Adam's first step of size ``eta`` (forward passes
    only; inf where not finite), each ``eta`` evaluated once (kept in ``points``), at most MAX_POINTS of them."""

    @torch.no_grad()
    def loss_at(eta: float) -> float:
        for p, p0, d in zip(params, saved, direction):
            p.copy_(p0 - eta * d)
        total = 0.0
        for b, n in zip(batches, counts):
            with autocast(device, compute_dtype):
                total += model(**b).loss.item() * n
        value = total / n_tok
        return value if math.isfinite(value) else math.inf

    def f(eta: float) -> float:
        eta = float(f"{eta:.12g}")  # (eta * sqrt(2) * sqrt(2) is 2 * eta)
        if eta not in points:
            if len(points) >= MAX_POINTS:
                raise QloraGaError(
                    f"--lr auto: no minimum of the loss along Adam's first step within {MAX_POINTS} points from "
                    f"{start:g} (last tried {eta:g}): pass --lr"
                )
            points[eta] = loss_at(eta)
        return points[eta]

    return f


def _search(f, start: float, points: dict, loss0: float, fp16: bool) -> tuple[float, float]:
    """``(eta*, the loss there)``: walk from ``start`` by factors of 2 until the middle of three points is the lowest,
    then the vertex of a parabola in log(eta) through three points, and once more at half the spacing around the
    nearer half-step point (the loss rises faster above eta* than below: a wide parabola's vertex sits low)."""
    eta = start
    while True:
        if f(2 * eta) < f(eta):
            eta *= 2
        elif f(eta / 2) < f(eta):
            eta /= 2
        else:
            break
    if not math.isfinite(f(eta)):  # the walk stops at once when every point is inf: never a silent lr
        tried = sorted(points)
        raise QloraGaError(
            f"--lr auto: the loss is not finite after any step tried along Adam's first update ({len(tried)} "
            f"steps from {tried[0]:g} to {tried[-1]:g}; {loss0:.4f} at the init){_hint(fp16)}"
        )
    x, _ = _vertex(f(eta / 2), f(eta), f(2 * eta))
    eta = eta * 2 ** (round(2 * x) / 2)
    r = 2**0.5
    x, at = _vertex(f(eta / r), f(eta), f(eta * r))
    return eta * r**x, at
