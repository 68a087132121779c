"""A torch.distributed process group behind the engine's `Comm` interface.

torchrun puts RANK, WORLD_SIZE, LOCAL_RANK and the rendezvous store in the environment;
`TorchComm.from_env` turns them into an initialised group on the right device.
"""

from __future__ import annotations

import gc
import math
import os
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import Tensor

from fltool.config import Config
from fltool.devices import resolve_device
from fltool.errors import FltoolError

# Set by torchrun (and by the elastic agent) in every worker.
TORCHRUN_ENV = ("TORCHELASTIC_RUN_ID", "LOCAL_RANK")


def under_torchrun() -> bool:
    return any(name in os.environ for name in TORCHRUN_ENV)


def resolve_backend(cfg: Config) -> str:
    """auto -> nccl when CUDA is visible (and the device is not forced to cpu), else gloo."""
    if cfg.ddp.backend != "auto":
        return cfg.ddp.backend
    return "nccl" if torch.cuda.is_available() and cfg.device != "cpu" else "gloo"


def rank_device(cfg: Config, backend: str, local_rank: int) -> torch.device:
    if backend == "nccl":
        if not torch.cuda.is_available():
            raise FltoolError("ddp.backend: nccl needs CUDA but no GPU is visible; use ddp.backend: gloo or auto")
        return torch.device("cuda", local_rank)
    device = resolve_device(cfg.device)
    # gloo on a GPU machine still gives each rank its own GPU.
    return torch.device("cuda", local_rank) if device.type == "cuda" else device


class Comm:
    """Single-process stand-in for a process group; `fltool.distributed` subclasses it."""

    rank = 0
    world_size = 1
    device: torch.device | None = None  # set by a distributed Comm to the rank's device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_reduce_sum(self, tensors: list[Tensor]) -> None:
        """Sum `tensors` in place across ranks."""

    def all_gather_rows(self, tensors: list[Tensor]) -> list[Tensor]:
        """Each tensor's rows (dim 0) from every rank, concatenated in rank order; every
        tensor of the list has the same number of rows on a rank."""
        return tensors

    def barrier(self) -> None:
        """Wait for every rank."""



class TorchComm(Comm):
    """Collectives over the default process group (created here, destroyed by `close`)."""

    def __init__(self, rank: int, world_size: int, local_rank: int, device: torch.device, backend: str) -> None:
        self.rank = rank
        self.world_size = world_size
        self.local_rank = local_rank
        self.device = device
        self.backend = backend

    @classmethod
    def from_env(cls, cfg: Config) -> TorchComm:
        backend = resolve_backend(cfg)
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        device = rank_device(cfg, backend, local_rank)
        kwargs = {}
        if device.type == "cuda":
            torch.cuda.set_device(device)
            kwargs["device_id"] = device  # binds NCCL communicators eagerly to this GPU
        # A short timeout turns a rank that never arrives into an error, not a hang.
        timeout = timedelta(seconds=cfg.ddp.timeout_s)
        store, rank, world_size = next(dist.rendezvous("env://", timeout=timeout))
        if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
            # The agent's shared store outlives restarts: without a prefix a restarted rank
            # can read a dead peer's gloo address. The restart count is only a stand-in for
            # the rendezvous round (agents that restarted for a membership change count
            # differently), so `fltool launch` turns sharing off and needs no prefix.
            attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
            store = dist.PrefixStore(f"fltool/attempt_{attempt}", store)
        dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=timeout, **kwargs)
        return cls(dist.get_rank(), dist.get_world_size(), local_rank, device, backend)

    def all_reduce_sum(self, tensors: list[Tensor]) -> None:
        if not tensors:
            return
        # One flat buffer: a single collective instead of one per tensor.
        flat = torch.cat([t.reshape(-1).to(torch.float64) for t in tensors])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        offset = 0
        for t in tensors:
            n = t.numel()
            t.copy_(flat[offset : offset + n].view_as(t))
            offset += n

    def all_gather_rows(self, tensors: list[Tensor]) -> list[Tensor]:
        if self.world_size == 1 or not tensors:
            return tensors
        # one float64 matrix of rows (exact for float32 values and ids below 2**53),
        # padded to the most rows any rank has: one collective for the counts, one for the rows
        rows = tensors[0].shape[0]
        flat = torch.cat([t.reshape(rows, math.prod(t.shape[1:])).to(torch.float64) for t in tensors], dim=1)
        counts = torch.zeros(self.world_size, dtype=torch.int64, device=flat.device)
        counts[self.rank] = rows
        dist.all_reduce(counts, op=dist.ReduceOp.SUM)
        counts_list = counts.tolist()
        padded = torch.zeros((max(counts_list), flat.shape[1]), dtype=torch.float64, device=flat.device)
        padded[:rows] = flat
        gathered = [torch.empty_like(padded) for _ in range(self.world_size)]
        dist.all_gather(gathered, padded)
        everyone = torch.cat([g[:c] for g, c in zip(gathered, counts_list, strict=True)])
        out, at = [], 0
        for t in tensors:
            width = math.prod(t.shape[1:])
            out.append(everyone[:, at : at + width].to(t.dtype).reshape(-1, *t.shape[1:]))
            at += width
        return out

    def min_max(self, value: int) -> tuple[int, int]:
        """The smallest and largest `value` over all ranks (one collective)."""
        t = torch.tensor([value, -value], dtype=torch.int64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return -int(t[1]), int(t[0])

    def broadcast(self, tensor: Tensor, src: int = 0) -> None:
        dist.broadcast(tensor, src=src)

    def barrier(self) -> None:
        if self.device is not None and self.device.type == "cuda":
            dist.barrier(device_ids=[self.device.index])
        else:
            dist.barrier()

    def close(self, clean: bool = True) -> None:
        """Destroy the group. `clean`: every rank got here normally, so wait for all first.

        Freeing DDP's reducer (and the gloo work objects it references) while the group
        is alive avoids an intermittent abort at interpreter exit.
        """
        if not dist.is_initialized():
            return
        gc.collect()
        if clean:
            self.barrier()
        dist.destroy_process_group()


def broadcast_from_main(comm: Comm, tensor: Tensor) -> None:
    """Rank 0's value of `tensor` on every rank; a no-op in a single process."""
    if comm.world_size > 1 and isinstance(comm, TorchComm):
        comm.broadcast(tensor, src=0)
