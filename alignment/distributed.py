"""A stage run by several processes (`accelerate launch` or `torchrun`, one process per GPU; gloo on CPU).

Every process runs the same stage file on the same inputs and takes the same decisions (what to resume, which rows
to read); each trains on its share of every batch. Files outside the Hugging Face Trainer (the output directory,
config.yaml, summary.json, merged/, caches) are written by the main process (rank 0) only, while the others wait at
`barrier()`. Without a launcher every function here is the one-process identity, so single-process runs are
unchanged.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def launched() -> bool:
    """True when a launcher started this process as one of several (WORLD_SIZE > 1 in the environment)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init() -> None:
    """Join the launcher's process group (nccl on CUDA, gloo on CPU) through accelerate's PartialState, the state the
    Hugging Face Trainer uses too; a no-op for one process or when the group already exists."""
    if launched() and not dist.is_initialized():
        from accelerate import PartialState

        PartialState(cpu=not torch.cuda.is_available())


def world_size() -> int:
    """Number of processes in the run (1 without a launcher)."""
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    """This process's index in the run (0 without a launcher)."""
    return dist.get_rank() if dist.is_initialized() else 0


def is_main() -> bool:
    """True on the process that writes the stage's files (rank 0)."""
    return rank() == 0


def barrier() -> None:
    """Wait until every process gets here (e.g. until the main process has written a file the others read)."""
    if world_size() > 1:
        dist.barrier()


def _comm_device(t: torch.Tensor) -> torch.device:
    # nccl moves CUDA tensors only; gloo moves CPU tensors
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def all_reduce(t: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """`t` summed (or max-ed, op="max") over processes, as a new tensor on t's device; `t` itself for one process."""
    if world_size() == 1:
        return t
    buf = t.detach().to(_comm_device(t)).clone()
    dist.all_reduce(buf, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return buf.to(t.device)


def all_gather_cat(t: torch.Tensor) -> torch.Tensor:
    """Every process's `t` (the same shape on each) concatenated along dim 0 in rank order; `t` for one process."""
    if world_size() == 1:
        return t
    src = t.detach().to(_comm_device(t), torch.uint8 if t.dtype == torch.bool else t.dtype).contiguous()  # gloo has no bool
    parts = [torch.empty_like(src) for _ in range(world_size())]
    dist.all_gather(parts, src)
    return torch.cat(parts).to(t.device, t.dtype)


def all_gather_objects(obj) -> list:
    """Every process's picklable `obj`, in rank order (`[obj]` for one process). Only for values this run made."""
    if world_size() == 1:
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def all_reduce_grads(params: list[torch.nn.Parameter]) -> None:
    """Sum the gradients of `params` over processes in one flat buffer, so each process steps with the gradient of the
    sum of every process's loss. A gradient missing on one process counts as zeros there; one missing on every
    process stays missing (the optimizer skips that parameter, as it would in one process)."""
    if world_size() == 1:
        return
    present = all_reduce(torch.tensor([float(p.grad is not None) for p in params]))
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = all_reduce(torch.cat([g.reshape(-1) for g in grads]))
    i = 0
    for p, g, n in zip(params, grads, present.tolist()):
        p.grad = flat[i: i + g.numel()].view_as(g).to(g.dtype) if n > 0 else None
        i += g.numel()


def broadcast_params(params: list[torch.Tensor]) -> None:
    """Copy rank 0's values of `params` to every process (same start whatever each process's initialisation)."""
    if world_size() == 1:
        return
    with torch.no_grad():
        for p in params:
            buf = p.detach().to(_comm_device(p)).contiguous()
            dist.broadcast(buf, src=0)
            p.copy_(buf.to(p.device))
