"""torch.distributed in one place: data parallelism over several processes (``torchrun`` / ``accelerate launch``).

One process (no launcher) is the default and needs none of this: every helper here is then the
identity. Under a launcher (``WORLD_SIZE`` > 1 in the environment) :func:`init` joins the process
group from the environment (``env://``): NCCL on GPUs (process ``LOCAL_RANK`` takes GPU
``LOCAL_RANK``), gloo on CPUs. Rank 0 is the main process: it alone prints, writes files and
reports bad input.
"""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist


def launched() -> bool:
    """Whether a launcher started this process as one of several."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init(timeout_minutes: float = 30.0) -> torch.device | None:
    """Join the process group of a launcher (once); return this process's device, or None without a launcher."""
    if not launched():
        return None
    local = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", init_method="env://",
                                timeout=datetime.timedelta(minutes=timeout_minutes),
                                **({"device_id": device} if cuda else {}))
    return device


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    return rank() == 0


def _device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def sum_values(*values: float) -> list[float]:
    """The sums over all processes of a few numbers (float64; one collective)."""
    if not active():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=_device())
    dist.all_reduce(t)
    return t.tolist()


def reduce_to(tensor: torch.Tensor, owner: int):
    """Sum ``tensor`` over all processes into process ``owner``'s copy (the others' copies are left undefined)."""
    if active():
        dist.reduce(tensor, dst=owner)


def gather_objects(obj) -> list:
    """Every process's ``obj`` (picklable), in rank order, on every process."""
    if not active():
        return [obj]
    out = [None] * world()
    dist.all_gather_object(out, obj)
    return out


def barrier():
    if active():
        dist.barrier()


def finish():
    """Leave the process group (at the end of a launched run)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
