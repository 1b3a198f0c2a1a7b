"""DistributedDataParallel helpers for ``torchrun`` (NCCL on CUDA, gloo on CPU).

``torchrun --nproc_per_node=2 -m LensSegCalibLib.training --config cfg.json`` sets RANK/WORLD_SIZE/LOCAL_RANK;
without them everything runs in one process and these helpers are no-ops.
"""
from __future__ import annotations

import gc
import logging
import os
import sys
from dataclasses import dataclass
from typing import NoReturn

import torch
import torch.distributed as dist

__all__ = ["DistInfo", "setup_distributed", "cleanup_distributed", "all_reduce_sum", "barrier", "launched_by_torchrun",
           "exit_worker"]


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits: ``rank`` of ``world_size``; ``device`` it trains on."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def setup_distributed(device: str | None = None) -> DistInfo:
    """Initialise the process group when launched by torchrun (WORLD_SIZE > 1); pick the device.

    ``device``: "cpu", "cuda" or None (CUDA if available). Under torchrun each process takes
    ``cuda:LOCAL_RANK``; the backend is NCCL on CUDA and gloo on CPU.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    want_cuda = torch.cuda.is_available() if device is None else str(device).startswith("cuda")
    if want_cuda and not torch.cuda.is_available():
        want_cuda = False  # asked for CUDA on a CPU machine: fall back, the trainer logs the device used
    dev = torch.device(f"cuda:{local}") if want_cuda else torch.device("cpu")
    if want_cuda:
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if want_cuda else "gloo")
    return DistInfo(rank=rank, world_size=world, local_rank=local, device=dev)


def cleanup_distributed() -> None:
    """Tear the process group down with every rank in step.

    All ranks meet at a barrier first, so no rank closes its gloo connections while another still uses them (a
    rank torn down early once aborted its peer on the 2-core CI machine: "terminate called without an active
    exception").
    """
    if dist.is_available() and dist.is_initialized():
        # DDP's reducer sits in reference cycles: collect them now, so that destroying the group really frees
        # its gloo threads here and not during interpreter teardown
        gc.collect()
        try:
            dist.barrier()
        finally:
            dist.destroy_process_group()


def launched_by_torchrun() -> bool:
    """True in a worker started by ``torchrun`` with more than one process (WORLD_SIZE > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def exit_worker(code: int) -> NoReturn:
    """End a torchrun worker after its work is done and saved, skipping C++ static destructors.

    The process group is already destroyed (:func:`cleanup_distributed`). On the loaded 2-core CI machine a
    rank still aborted now and then at interpreter exit ("terminate called without an active exception",
    SIGABRT), after every file was written, so torchrun reported a failed job. ``os._exit`` after flushing the
    streams and logging handlers leaves nothing behind to abort.
    """
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # closed or broken pipe: nothing left to flush
            pass
    os._exit(int(code))


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over all processes (in place on a copy); identity without a process group."""
    out = t.clone()
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
