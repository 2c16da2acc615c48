"""The model's own loss head, for the gradient pass: from the last decoder block's output to the loss.

The pass needs dL/dh for the output h of the last decoder block. What a model computes after its
last block differs by family: the final norm and the LM head, and then Gemma's final logit
softcapping, Granite's logits scaling, Cohere's logit scale, ... A hand-rebuilt ``lm_head(norm(h))``
is silently wrong on those families. So the head runs the model's own forward with its decoder
blocks swapped for a stand-in that returns h: everything the family does after its blocks, in the
decoder and in the causal-LM wrapper, is done by the family's own code. Label tokens go through it
in chunks, so tokens x vocab logits are never held at once.

A self-check on the first micro-batch compares these logits with the model's ordinary forward at a
few label positions; a mismatch stops the pass with one line naming the model class, never a wrong G.
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
from torch import nn

from ..constants import IGNORE_INDEX
from ..errors import QloraGaError

CHECK_POSITIONS = 4  # sequence positions the self-check compares (all rows of the first micro-batch)


class _BlockOutput(nn.Module):
    """Stands in for the decoder blocks: returns the given last-block output, whatever its input.

    Attributes the decoder reads from its blocks (e.g. ``attention_type``) come from the real last block.
    """

    def __init__(self, like: nn.Module, hidden: torch.Tensor, as_tuple: bool):
        super().__init__()
        self.__dict__["_like"] = like
        self.hidden, self.as_tuple = hidden, as_tuple

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.__dict__["_like"], name)

    def forward(self, *args, **kwargs):
        return (self.hidden,) if self.as_tuple else self.hidden


def _unwrap(out) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


class ModelHead:
    """Run the decoder, keep the last block's output, and give the loss and dL/dh from the model's own head.

    Use as a context manager (it hooks the last block to capture its output).
    """

    def __init__(self, model: nn.Module, layers_name: str, layers: nn.ModuleList):
        self.model = model
        self.decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
        owner_name, _, self.layers_attr = layers_name.rpartition(".")
        self.layers_owner = model.get_submodule(owner_name) if owner_name else model
        self.layers = layers
        self.as_tuple = False
        self._last: list[torch.Tensor] = []
        self._handle = None
        params = inspect.signature(model.forward).parameters
        self._extra = {k: v for k, v in (("use_cache", False), ("output_router_logits", False)) if k in params}
        self._keep_arg = "logits_to_keep" in params
        # models with learned absolute positions cannot take more dummy tokens than they have positions
        self.max_chunk = getattr(model.config, "max_position_embeddings", None) or 1 << 30

    def __enter__(self):
        def keep(module, args, output):
            self.as_tuple = isinstance(output, (tuple, list))
            self._last.append(_unwrap(output).detach())

        self._handle = self.layers[-1].register_forward_hook(keep)
        return self

    def __exit__(self, *exc):
        self._handle.remove()
        self._last.clear()

    # ---------------------------------------------------------------- forward

    def run(self, batch: dict, device, check: bool = False) -> torch.Tensor:
        """Forward one micro-batch through the decoder; return the last block's output (B, T, H).

        ``check``: run the whole model instead and compare its logits with :meth:`logits` (see module doc).
        A padding-free batch (``position_ids``, no ``attention_mask``; :mod:`qlora_ga.data.packing`) goes in as it is.
        """
        ids = batch["input_ids"].to(device)
        if "attention_mask" in batch:
            mask = batch["attention_mask"].to(device)
            inputs = {"input_ids": ids, "attention_mask": mask}
        else:  # flattened: transformers makes the attention block-diagonal from the restarting position_ids
            mask = torch.ones_like(ids)
            inputs = {"input_ids": ids, "position_ids": batch["position_ids"].to(device)}
        if not check:
            self.decoder(**inputs, use_cache=False)
            return self._last.pop()
        labels = batch["labels"][:, 1:]
        t = torch.unique((labels != IGNORE_INDEX).nonzero()[:, 1])[:CHECK_POSITIONS].to(device)
        kw = {"logits_to_keep": t} if self._keep_arg else {}
        # a flattened batch needs use_cache=False: with a cache transformers skips the packed-sequence mask
        extra = {**self._extra, **({"use_cache": False} if "position_ids" in inputs else {})}
        logits = self.model(**inputs, **extra, **kw).logits
        h = self._last.pop()
        if not self._keep_arg:
            logits = logits[:, t]
        valid = mask[:, t].bool()  # padded positions of shorter rows are not compared
        self._check(logits[valid], self.logits(h[:, t][valid]))
        return h

    def _check(self, reference: torch.Tensor, ours: torch.Tensor):
        ref, ours = reference.float(), ours.float()
        if not torch.isfinite(ref).all():
            raise QloraGaError("the sample loss is not finite (the model's logits hold NaN/inf): check the data and the model weights")
        diff = float((ref - ours).abs().max()) / max(float(ref.abs().max()), 1e-6)
        tol = 1e-3 if reference.dtype == torch.float32 else 3e-2
        if not diff <= tol:
            raise QloraGaError(
                f"the gradient pass cannot reproduce the logits of {type(self.model).__name__} from its last decoder block "
                f"(relative difference {diff:.2g}): this model class is not supported by the gradient inits; "
                "use --init gaussian, or report the model class"
            )

    # ---------------------------------------------------------------- head

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """The model's own logits (K, V) for last-block outputs ``h`` (K, H), through its own forward."""
        stand_in = nn.ModuleList([_BlockOutput(self.layers[-1], h[None], self.as_tuple)])
        setattr(self.layers_owner, self.layers_attr, stand_in)
        try:
            dummy = torch.zeros((1, h.shape[0]), dtype=torch.long, device=h.device)
            out = self.model(input_ids=dummy, **self._extra)
        finally:
            setattr(self.layers_owner, self.layers_attr, self.layers)
        return out.logits[0]

    def loss_grad(self, h_last: torch.Tensor, labels: torch.Tensor, chunk_tokens: int) -> tuple[torch.Tensor, float]:
        """d(summed loss)/dh for the last block's output (zero where no label), and this micro-batch's summed loss.

        The gradient of the *summed* token losses, not of their mean: each token's entries stay O(1)
        (p - y through the head), where the mean's (p - y) / N would fall below fp16's normal range
        for N in the thousands. The pass divides G by N in fp32 at the end.
        """
        grad = torch.zeros_like(h_last)
        targets = labels[:, 1:].to(h_last.device)
        pos = (targets != IGNORE_INDEX).nonzero(as_tuple=False)  # (N_mb, 2): (b, t)
        chunk = max(1, min(chunk_tokens, self.max_chunk))
        loss_sum = 0.0
        for s in range(0, pos.shape[0], chunk):
            p = pos[s : s + chunk]
            x = h_last[p[:, 0], p[:, 1]].detach().requires_grad_(True)
            with torch.enable_grad():
                logits = self.logits(x).float()
                loss = F.cross_entropy(logits, targets[p[:, 0], p[:, 1]], reduction="sum")
                (gx,) = torch.autograd.grad(loss, x)
            grad[p[:, 0], p[:, 1]] = gx.to(grad.dtype)
            loss_sum += float(loss)
        return grad, loss_sum
