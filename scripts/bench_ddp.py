"""Throughput of fltool's DDP step loop against the textbook DDP loop, on MNIST.

Run standalone (a process group of one is created on localhost) or under torchrun:

    python scripts/bench_ddp.py --steps 50 --device cpu
    torchrun --standalone --nproc-per-node 2 scripts/bench_ddp.py --steps 200

(a) fltool: `fltool.trainers.ddp.train_steps` on GPU/CPU-resident tensors with
    the trainer's index sharding -- the exact code `mode: ddp` runs.
(b) textbook: torchvision MNIST with ToTensor/Normalize, DistributedSampler and a
    DataLoader with num_workers=0, as in PyTorch's DDP tutorial.
(c) tuned: the same DataLoader with 4 workers and pinned memory (skip: --no-tuned).
All three train the same model with the same optimizer and per-rank batch on one DDP
wrapper each. Rank 0 prints images/s (all ranks) and the ratios.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import time
from collections.abc import Callable, Iterator

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from fltool.config import config_from_dict
from fltool.data import load_dataset
from fltool.data.datasets import cache_root
from fltool.devices import keep_freed_host_memory
from fltool.distributed.comm import TorchComm, under_torchrun
from fltool.trainers.ddp_optim import make_optimizer, make_scheduler
from fltool.distributed.sharding import rank_batches
from fltool.trainers.ddp import train_steps
from fltool.models.setup import seeded_model


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=200, help="timed optimizer steps per loop")
    p.add_argument("--warmup", type=int, default=10, help="untimed steps first")
    p.add_argument("--batch-size", type=int, default=64, help="per rank")
    p.add_argument("--model", default="cnn_small", help="cnn_small (the seed article's), cnn or mlp")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--rounds", type=int, default=3, help="alternate the loops this often; best time counts")
    p.add_argument("--tuned", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--data-root", default=None, help="raw MNIST archives (default $FLTOOL_DATA)")
    return p.parse_args()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def standalone_env() -> None:
    """A process group of one, so the DDP code paths run without torchrun."""
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))


def timed(loop: Callable[[int], None], steps: int, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    dist.barrier()
    t0 = time.perf_counter()
    loop(steps)
    if device.type == "cuda":
        torch.cuda.synchronize()
    dist.barrier()
    return time.perf_counter() - t0


def main() -> None:
    args = parse()
    if not under_torchrun():
        standalone_env()
    raw = {
        "mode": "ddp",
        "device": args.device,
        "data": {"dataset": "mnist", "root": args.data_root},
        "model": {"name": args.model},
        "ddp": {"batch_size": args.batch_size, "lr": 0.01, "optimizer": "momentum", "timeout_s": 120},
    }
    cfg = config_from_dict(raw)
    comm = TorchComm.from_env(cfg)
    device, rank, world = comm.device, comm.rank, comm.world_size
    keep_freed_host_memory(device)  # as the trainer does on CPU; all three loops run with it
    try:
        dataset = load_dataset(cfg.data, cfg.seed)  # also extracts the archives into the cache
        total = args.warmup + args.steps * args.rounds
        loops: dict[str, Callable[[int], None]] = {}

        def new_ddp() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
            model = seeded_model(cfg, dataset, device)
            ids = [device.index] if device.type == "cuda" else None
            ddp = DistributedDataParallel(model, device_ids=ids)
            return ddp, make_optimizer(ddp, cfg.ddp)

        # (a) fltool: tensors on the device, index batches, the trainer's own step loop.
        gpu_data = dataset.train.to(device)
        ddp, opt = new_ddp()
        sched = make_scheduler(opt, cfg.ddp, total)
        batches = torch.cat([
            rank_batches(len(gpu_data), 0, epoch, args.batch_size, 1, rank, world)
            for epoch in range(1, 2 + total * args.batch_size * world // len(gpu_data))
        ]).to(device)
        cursor = [0]

        def fltool_loop(n: int) -> None:
            window = batches[cursor[0] : cursor[0] + n]
            train_steps(ddp, opt, sched, gpu_data.x, gpu_data.y, window, contextlib.nullcontext())
            cursor[0] += n

        loops["fltool"] = fltool_loop

        # (b) and (c): the DataLoader loops.
        loader_opts = {"textbook": dict(num_workers=0)}
        if args.tuned:
            loader_opts["tuned"] = dict(num_workers=4, pin_memory=device.type == "cuda", persistent_workers=True)
        for name, opts in loader_opts.items():
            ddp_l, opt_l = new_ddp()
            it = textbook_batches(cache_root(cfg.data), rank, world, args.batch_size, opts)

            def loader_loop(n: int, ddp=ddp_l, opt=opt_l, it=it) -> None:
                for _ in range(n):
                    x, y = next(it)
                    x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                    opt.zero_grad()
                    loss = F.cross_entropy(ddp(x), y)
                    loss.backward()
                    opt.step()

            loops[name] = loader_loop

        for loop in loops.values():
            loop(args.warmup)
        # Alternate the loops and keep each one's best round: other load on the machine
        # then hurts all of them alike instead of whichever happened to run during it.
        results = {name: float("inf") for name in loops}
        for _ in range(args.rounds):
            for name, loop in loops.items():
                results[name] = min(results[name], timed(loop, args.steps, device))

        if rank == 0:
            report(results, args, world, device)
    finally:
        comm.close()


def textbook_batches(root, rank: int, world: int, batch_size: int, opts: dict) -> Iterator:
    """The tutorial's input pipeline, epoch after epoch (with set_epoch)."""
    from torch.utils.data import DataLoader, DistributedSampler
    from torchvision import datasets, transforms

    tf = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.1307,), (0.3081,))])
    data = datasets.MNIST(str(root), train=True, download=False, transform=tf)
    sampler = DistributedSampler(data, num_replicas=world, rank=rank, shuffle=True, seed=0)
    loader = DataLoader(data, batch_size=batch_size, sampler=sampler, **opts)
    epoch = 0
    while True:
        sampler.set_epoch(epoch)
        yield from loader
        epoch += 1


def report(results: dict[str, float], args: argparse.Namespace, world: int, device: torch.device) -> None:
    images = args.steps * args.batch_size * world
    print(
        f"device {device}, world size {world}, model {args.model}, batch {args.batch_size}/rank, "
        f"{args.steps} steps, best of {args.rounds} rounds"
    )
    rate = {name: images / seconds for name, seconds in results.items()}
    for name, r in rate.items():
        print(f"{name:>9}: {r:10.0f} images/s  ({results[name]:.2f} s)")
    print(f"fltool/textbook: {rate['fltool'] / rate['textbook']:.2f}x")
    if "tuned" in rate:
        print(f"fltool/tuned:    {rate['fltool'] / rate['tuned']:.2f}x")


if __name__ == "__main__":
    main()
