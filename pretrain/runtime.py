"""Where and how one training process runs: device, torchrun/DDP process group, autocast precision, threads, seed,
and the SIGINT/SIGTERM flag that every rank must agree on before it stops.

Kept apart from the loop so that the loop reads the same on one CPU process and on one rank of an NCCL job: the
collectives below are no-ops outside a process group.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from pretrain.config import TrainConfig
from pretrain.distributed import broadcast_seed, get_rank, get_world_size, is_distributed, shutdown
from pretrain.rundir import TrainError


def init_distributed(want_device: str = "auto") -> tuple[bool, int]:
    """Join the torchrun process group when launched under torchrun; returns (distributed, local_rank).

    A one-process torchrun joins a group too, so `torchrun --nproc_per_node 1` runs the real DDP path (process
    group, DistributedDataParallel wrapper, collectives) rather than silently the single-process one; that is
    how scripts/gpu_check.sh proves the NCCL path on a one-GPU machine. NCCL only when training on CUDA:
    train.device=cpu on a GPU machine uses gloo. torchrun sets TORCHELASTIC_RUN_ID in every worker; a plain
    process with WORLD_SIZE > 1 is also a rank.
    """
    launched = "TORCHELASTIC_RUN_ID" in os.environ or int(os.environ.get("WORLD_SIZE", "1")) > 1
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not launched or (dist.is_available() and dist.is_initialized()):
        return is_distributed(), local_rank
    on_cuda = want_device.startswith("cuda") or (want_device == "auto" and torch.cuda.is_available())
    backend = "nccl" if on_cuda and torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend=backend)
    return True, local_rank


def select_device(want: str, local_rank: int) -> torch.device:
    """train.device as a torch device; 'auto' and a bare 'cuda' mean this rank's GPU (LOCAL_RANK)."""
    if want == "auto":
        want = "cuda" if torch.cuda.is_available() else "cpu"
    if want.startswith("cuda"):
        if not torch.cuda.is_available():
            raise TrainError(f"train.device={want} but CUDA is not available")
        return torch.device(f"cuda:{local_rank}" if want == "cuda" else want)
    if want == "mps" and not torch.backends.mps.is_available():
        raise TrainError("train.device=mps but MPS is not available")
    return torch.device(want)


def cpu_has_fast_bf16() -> bool:
    """True when the CPU has native bf16 dot products (AVX512-BF16 or AMX), where bf16 autocast pays off:
    measured 1.75x per step for the quarter-width ResNet-18 (bench/bench_loader.py); without them it is slower."""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False
    flags = next((line for line in text.splitlines() if line.startswith("flags")), "")
    return any(f in flags.split() for f in ("avx512_bf16", "amx_bf16"))


def autocast_dtype(want: str, device: torch.device) -> torch.dtype | None:
    """autocast dtype or None. 'auto' = bf16 on GPUs that support it and on CPUs with native bf16, else fp32.
    The losses always compute in fp32 (pretrain/losses/precision.py)."""
    if want == "auto":
        fast = torch.cuda.is_bf16_supported() if device.type == "cuda" else device.type == "cpu" and cpu_has_fast_bf16()
        return torch.bfloat16 if fast else None
    if want == "fp32":
        return None
    if want == "fp16" and device.type != "cuda":
        raise TrainError("train.precision=fp16 needs a CUDA device; use bf16 or fp32")
    return torch.bfloat16 if want == "bf16" else torch.float16


class StopFlag:
    """SIGINT/SIGTERM -> finish the step, checkpoint, stop. A second SIGINT aborts immediately."""

    def __init__(self) -> None:
        self.requested = False
        self._old: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True

    def __enter__(self) -> StopFlag:
        if threading.current_thread() is threading.main_thread():  # signal handlers live on the main thread only
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


@dataclass
class Runtime:
    """This process's place in the job and how it computes; the collectives are no-ops when not distributed."""

    device: torch.device
    distributed: bool
    rank: int
    world: int
    amp_dtype: torch.dtype | None

    def seed(self, seed: int) -> int:
        """Seed torch's global RNG with rank 0's seed (identical initial weights everywhere); returns it."""
        seed = broadcast_seed(seed)
        torch.manual_seed(seed)
        return seed

    def autocast(self) -> torch.autocast:
        return torch.autocast(
            self.device.type, dtype=self.amp_dtype or torch.float32, enabled=self.amp_dtype is not None
        )

    def grad_scaler(self) -> torch.amp.GradScaler:
        """fp16 needs loss scaling; for bf16 and fp32 the scaler is disabled and passes loss and steps through."""
        return torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def wrap(self, net: nn.Module) -> nn.Module:
        if not self.distributed:
            return net
        return nn.parallel.DistributedDataParallel(
            net, **({"device_ids": [self.device.index]} if self.device.type == "cuda" else {})
        )

    def any_rank(self, flag: bool) -> bool:
        """True on every rank when it is True on one (a signal may reach only some ranks)."""
        if not self.distributed:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item() > 0)

    def digests(self, model: nn.Module) -> list[str]:
        """Every rank's sha256 of its parameters, in rank order: equal digests prove the replicas stayed identical."""
        h = hashlib.sha256()
        for name, p in sorted(model.named_parameters()):
            h.update(name.encode())
            h.update(p.detach().float().cpu().contiguous().numpy().tobytes())
        digest = h.hexdigest()
        if not self.distributed:
            return [digest]
        gathered: list[Any] = [None] * self.world
        dist.all_gather_object(gathered, digest)
        return [str(d) for d in gathered]

    def describe(self) -> dict[str, Any]:
        return {
            "world_size": self.world,
            "ddp_backend": str(dist.get_backend()) if self.distributed else None,
            "device": str(self.device),
            "precision": str(self.amp_dtype or "fp32"),
        }


@contextlib.contextmanager
def launch(cfg: TrainConfig) -> Iterator[Runtime]:
    """Join the process group (under torchrun) for the block and leave it after: with a barrier after a clean
    run, without one after an error (the other ranks may be inside another collective)."""
    distributed, local_rank = init_distributed(cfg.train.device)
    clean = False
    try:
        device = select_device(cfg.train.device, local_rank)
        threads = cfg.train.threads
        if threads == 0 and distributed and device.type == "cpu":  # share the cores among this node's ranks
            threads = max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", get_world_size())))
        if threads > 0:
            torch.set_num_threads(threads)
        amp = autocast_dtype(cfg.train.precision, device)
        yield Runtime(device, distributed, get_rank(), get_world_size(), amp)
        clean = True
    finally:
        if distributed:
            shutdown(clean)
