"""A finished block's gradients -> their reductions (the SVD), on one process or shared out over several."""

from __future__ import annotations

from collections.abc import Callable

import torch

from .. import distributed
from ..errors import QloraGaError


def reduce_block(G: dict[str, torch.Tensor], n_total: int, reduce_fn: Callable, first: int) -> dict[str, object]:
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
