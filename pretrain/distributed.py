"""torch.distributed helpers: let the losses see the GLOBAL batch and draw identical randomness on all ranks.

Gradient convention (checked by tests/test_losses_ddp.py):
    Every rank gathers the per-rank embeddings with ``gather_with_grad`` and evaluates the loss on the global
    batch, so each rank's loss VALUE equals the single-process loss on the concatenated batch. The backward of
    the gather SUMS the gradients that all ranks send to a slice, so rank r receives
    ``world_size * dL/dz_r`` for its local embeddings. DDP then AVERAGES parameter gradients across ranks:
    ``(1/W) * sum_r W * dL/dz_r * dz_r/dtheta = dL/dtheta``, exactly the single-process gradient of the loss
    on the global batch. (More generally DDP optimises the mean over ranks of the per-rank losses, each
    differentiated through every rank's inputs; a per-rank loss equal to the global loss makes that mean the
    global loss.) No extra scaling by the world size is needed, and none must be added.

Requirement: every rank passes the same local batch size (DistributedSampler plus drop_last=True), because
all_gather moves equal-shaped tensors.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    """True when a process group with more than one rank is active (the only case needing collectives)."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def get_world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def get_rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums every rank's gradient for this rank's slice.

    The sum is one all_reduce of the full gradient followed by taking the local slice: all_reduce exists on every
    backend (gloo has no reduce_scatter), and it replaces torch.distributed.nn.functional.all_gather, which is
    deprecated in favour of a private API.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, dim: int) -> torch.Tensor:  # type: ignore[override]
        world, rank = dist.get_world_size(), dist.get_rank()
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x)
        ctx.dim, ctx.rank, ctx.size = dim, rank, x.shape[dim]
        return torch.cat(parts, dim=dim)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad.narrow(ctx.dim, ctx.rank * ctx.size, ctx.size).contiguous(), None


def gather_with_grad(x: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """Concatenate ``x`` from all ranks along ``dim``, keeping the autograd graph to every rank's slice.

    The backward sums the incoming gradients over ranks; see the module docstring for why that sum is the
    right convention under DDP. Outside a multi-rank process group it returns ``x`` itself, so single-process
    code pays nothing.
    """
    if not is_distributed():
        return x
    return _GatherWithGrad.apply(x.contiguous(), dim)


def broadcast_seed(seed: int) -> int:
    """Return rank 0's ``seed`` on every rank, so per-loss random streams start identical everywhere.

    broadcast_object_list picks the right device for the backend (CUDA for NCCL), unlike a hand-made tensor.
    """
    if not is_distributed():
        return int(seed)
    box = [int(seed)]
    dist.broadcast_object_list(box, src=0)
    return int(box[0])


def broadcast_(x: torch.Tensor, src: int = 0) -> torch.Tensor:
    """In-place broadcast of ``x`` from ``src``: guards against rank drift of ops not bitwise-stable."""
    if is_distributed():
        dist.broadcast(x, src=src)
    return x


def shutdown(clean: bool = True) -> None:
    """Leave the process group: after a clean run wait for every rank first, then destroy it.

    Without the barrier a fast rank can tear down its gloo connections while a slow one still uses them, and the
    slow one may then abort at exit ("terminate called without an active exception"). After an error
    (``clean=False``) there is no barrier: the other ranks may be inside a different collective, and waiting
    for them could hang until the process group's timeout.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return
    try:
        if clean and dist.get_world_size() > 1:
            dist.barrier()
    finally:
        dist.destroy_process_group()
