"""torch.distributed in one place: data parallelism over several processes (``torchrun`` / ``accelerate launch``).

One process (no launcher) is the default and needs none of this: every helper here is then the
identity. Under a launcher (``WORLD_SIZE`` > 1 in the environment) :func:`init` joins the process
group from the environment (``env://``): NCCL on GPUs (process ``LOCAL_RANK`` takes GPU
``LOCAL_RANK``), gloo on CPUs. Rank 0 is the main process: it alone prints, writes files and
reports bad input.
"""

from __future__ import annotations

import contextlib
import datetime
import os

import torch
import torch.distributed as dist

from .errors import QloraGaError


def launched() -> bool:
    """Whether a launcher started this process as one of several."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init(cpu: bool = False, timeout_minutes: float = 30.0) -> torch.device | None:
    """Join the process group of a launcher (once); return this process's device, or None without a launcher.

    ``cpu``: gloo on the CPU even where GPUs are present.
    """
    if not launched():
        return None
    local = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available() and not cpu
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
    """This process's rank (from the launcher's environment before the group is joined), 0 without a launcher."""
    if active():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0")) if launched() else 0


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


def sum_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` summed over all processes, in place (on the backend's device); itself with one process."""
    if active():
        dist.all_reduce(tensor)
    return tensor


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


@contextlib.contextmanager
def main_first():
    """The main process runs the block first (e.g. to fill a cache), then the others. If it fails there
    (bad input, which would fail everywhere), the others raise the same error without running the block."""
    if not active():
        yield
        return
    if not is_main():
        status = [None]
        dist.broadcast_object_list(status, src=0)
        if status[0] is not None:
            raise QloraGaError(status[0])
        yield
        return
    try:
        yield
    except BaseException as e:
        dist.broadcast_object_list([str(e) or type(e).__name__], src=0)
        raise
    dist.broadcast_object_list([None], src=0)


def peer_failed(e: BaseException) -> bool:
    """Whether ``e`` is a collective that broke because another process went away."""
    text = str(e).lower()
    return isinstance(e, getattr(dist, "DistBackendError", ())) or any(
        w in text for w in ("closed by peer", "connection reset", "broken pipe", "nccl communicator was aborted"))


def barrier():
    if active():
        dist.barrier()


def finish():
    """Leave the process group (at the end of a launched run)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
