"""`mode: ddp`: data-parallel minibatch training with DistributedDataParallel.

Each rank trains on its shard of every global batch (see `sharding`); DDP averages the
gradients with all-reduce during backward, so every rank applies the same update.
Rank 0 evaluates, logs and checkpoints; the other ranks wait at a barrier so that a
checkpoint is on disk before anyone starts the next epoch (a restarted group resumes
from it). A model that goes NaN or inf stops the run after that epoch, as a diverged
federated run stops. In a single process (`fltool train`) there is no process group
and no DDP wrapper; the arithmetic is the same.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from fltool.algorithms import derive_seed
from fltool.config import Config
from fltool.data import load_dataset
from fltool.devices import autocast_for, keep_freed_host_memory
from fltool.distributed.comm import Comm, broadcast_from_main
from fltool.distributed.faults import maybe_inject_fault
from fltool.trainers.ddp_optim import make_optimizer, make_scheduler, resume_schedule, schedule_rule
from fltool.distributed.sharding import rank_batches, steps_per_epoch
from fltool.run.checkpoint import Checkpoint, make_checkpoint, save_checkpoint
from fltool.trainers.evaluate import evaluate
from fltool.trainers.progress import Decision, Progress, RunSummary, all_finite, diverged, read_scalars, summarize
from fltool.run.metrics import MetricsLog
from fltool.run.resume import check_resumable
from fltool.run.rundir import best_checkpoint, last_checkpoint
from fltool.devices import resolve_device
from fltool.models.setup import seeded_model

RowCallback = Callable[[dict[str, Any]], None]


def wrap_model(model: nn.Module, device: torch.device, compile_model: bool) -> nn.Module:
    """DDP when a process group exists (even of size 1, so `launch --nproc 1` is real DDP),
    around the module itself or, with `compile_model`, around `torch.compile(module)`.

    Compiling the DDP wrapper instead (PyTorch's suggested order, for DDPOptimizer's
    bucket-sized graphs) compiled nothing here (torch 2.14.1, gloo): dynamo broke its
    graph inside DDP's forward and then skipped nn.Sequential's forward as a torch.nn
    frame, so the model silently ran eagerly (seen with TORCH_LOGS=dynamo; cf.
    pytorch/pytorch#140416). Compiled inside, the backward's gradients reach DDP's
    hooks together at its end, so all-reduce overlaps less of it; for these small
    models that costs little."""
    inner = torch.compile(model) if compile_model else model
    if not dist.is_initialized():
        return inner
    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(inner, device_ids=ids)


def train_steps(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    x: torch.Tensor,
    y: torch.Tensor,
    batches: torch.Tensor,
    autocast: contextlib.AbstractContextManager,
    on_step: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """Optimizer steps over `batches` [steps, accum, batch] of device indices; `on_step`
    hears the count of steps done (for a progress bar; it must not sync with the device).

    Returns the sum of micro-batch losses as a device tensor: no host sync in the loop.
    `model` is `wrap_model`'s: the DDP wrapper, or the (maybe compiled) module in a
    single process.
    """
    accum = batches.shape[1]
    loss_sum = torch.zeros((), device=x.device, dtype=torch.float64)
    for done, step_batches in enumerate(batches, start=1):
        for j, idx in enumerate(step_batches):
            # Accumulating micro-batches skip DDP's all-reduce; the last one syncs.
            syncing = j == accum - 1 or not isinstance(model, DistributedDataParallel)
            with contextlib.nullcontext() if syncing else model.no_sync():
                with autocast:
                    logits = model(x[idx])
                loss = F.cross_entropy(logits.float(), y[idx])
                (loss / accum).backward()
            loss_sum += loss.detach()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if on_step is not None:
            on_step(done)
    return loss_sum


def train_ddp(
    cfg: Config,
    run_dir: Path,
    on_row: RowCallback | None = None,
    resume: Checkpoint | None = None,
    comm: Comm | None = None,
    on_progress: Callable[[int, float], None] | None = None,
) -> RunSummary:
    """`on_progress(epoch, fraction)`: how far into an epoch rank 0 is, as it goes."""
    t_setup = time.perf_counter()
    comm = comm or Comm()
    dcfg = cfg.ddp
    device = comm.device or resolve_device(cfg.device)
    keep_freed_host_memory(device)
    dataset = load_dataset(cfg.data, cfg.seed).to(device)
    raw = seeded_model(cfg, dataset, device)  # same initial weights on every rank
    optimizer = make_optimizer(raw, dcfg)
    global_batch = dcfg.batch_size * dcfg.grad_accum_steps * comm.world_size
    steps = steps_per_epoch(len(dataset.train), global_batch)
    scheduler = make_scheduler(optimizer, dcfg, dcfg.epochs * steps)

    log = MetricsLog(run_dir, tensorboard=cfg.output.tensorboard)
    progress = Progress(cfg)
    start = 1
    if resume is not None:
        check_resumable(resume, cfg, last_checkpoint(run_dir), comm.world_size, "this run")
        raw.load_state_dict(resume.model)
        optimizer.load_state_dict(resume.extra["optimizer"])
        resume_schedule(scheduler, resume.extra["scheduler"], schedule_rule(dcfg, dcfg.epochs * steps))
        progress.best = resume.best_accuracy
        log.rows = list(resume.metrics)
        if comm.is_main:
            # the checkpoint's rows are the truth: a kill between writing it and the
            # metrics files leaves those a round behind, even when nothing is left to train
            log.flush()
        start = progress.first(resume.round, log.rows)
    stopped = None
    if resume is not None and not all_finite(list(raw.parameters())).item():  # (one sync, at set-up)
        # a run that diverged stops again, training no NaN epochs, whatever its new epoch
        # cap; every rank restored the same checkpoint, so every rank skips the loop
        stopped, start = diverged("epoch", resume.round), dcfg.epochs + 1

    model = wrap_model(raw, device, dcfg.compile)
    autocast = autocast_for(dcfg.amp, device)
    x_train, y_train = dataset.train.x, dataset.train.y
    elapsed0 = log.rows[-1]["elapsed_s"] if log.rows else 0.0
    t0 = time.perf_counter()

    for epoch in range(start, dcfg.epochs + 1):
        maybe_inject_fault(run_dir, epoch, comm.rank)
        t_epoch = time.perf_counter()
        # Per-(epoch, rank) seed: dropout is reproducible and a resumed run matches.
        torch.manual_seed(derive_seed(cfg.seed, "ddp_dropout", epoch, comm.rank))
        batches = rank_batches(
            len(dataset.train), cfg.seed, epoch, dcfg.batch_size, dcfg.grad_accum_steps, comm.rank, comm.world_size
        ).to(device)
        model.train()
        on_step = None
        if on_progress is not None and comm.is_main:
            on_step = lambda done, epoch=epoch: on_progress(epoch, done / len(batches))  # noqa: E731
        loss_sum = train_steps(model, optimizer, scheduler, x_train, y_train, batches, autocast, on_step)

        comm.all_reduce_sum([loss_sum])  # every rank, every epoch
        # the epoch's one host sync: its loss and whether the model is finite. DDP
        # all-reduces the gradients, so every rank applies the same update and holds the
        # same parameters: each rank decides a divergence stop identically, without a
        # collective, and all of them evaluate (broadcast), wait at the barrier and
        # break at the same epoch.
        loss, finite = read_scalars(loss_sum, all_finite(list(raw.parameters())))
        if not finite:
            stopped = diverged("epoch", epoch)
        row: dict[str, Any] = {
            "epoch": epoch,
            "steps": steps * epoch,
            "train_loss": loss / (steps * dcfg.grad_accum_steps * comm.world_size),
            "test_loss": None,
            "test_accuracy": None,
            "lr": scheduler.get_last_lr()[0],
        }
        if progress.evaluates(epoch, last=not finite):
            # Rank 0 evaluates the plain module (no DDP hooks, so no collective inside);
            # the result is broadcast so that every rank takes the same early-stop decision.
            result = torch.zeros(2, device=device, dtype=torch.float64)
            if comm.is_main:
                ev = evaluate(raw, dataset.test, cfg.eval.batch_size, dataset.num_classes)
                result.copy_(torch.tensor([ev.loss, ev.accuracy], dtype=torch.float64))
            broadcast_from_main(comm, result)
            row["test_loss"], row["test_accuracy"] = result.tolist()
        wall = time.perf_counter() - t_epoch
        row["wall_s"] = wall
        row["elapsed_s"] = elapsed0 + time.perf_counter() - t0
        row["images_per_s"] = steps * global_batch / wall
        if not finite:
            row["stopped"] = stopped  # in the checkpoint's rows too: `fltool runs` reads it

        decision = progress.decide(epoch, row["test_accuracy"], last=not finite)  # (a diverged epoch: the last)
        log.rows.append(row)
        if comm.is_main:
            if decision.save_last or decision.save_best:
                _save(cfg, run_dir, raw, optimizer, scheduler, epoch, log, progress.best, decision, comm.world_size)
            log.flush()  # after the checkpoint, as in the federated loop
            if on_row:
                on_row(row)
        comm.barrier()  # the checkpoint of this epoch exists before any rank goes on
        if decision.stop:
            break

    summary = summarize(run_dir, log.rows, "epoch", progress.best, cfg.eval.target_accuracy, t_setup, t0)
    summary.stopped = stopped
    return summary


def _save(
    cfg: Config,
    run_dir: Path,
    raw: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    epoch: int,
    log: MetricsLog,
    best: float | None,
    decision: Decision,
    world_size: int,
) -> None:
    """Checkpoints hold the unwrapped module's weights, so `fltool eval` can load them."""
    extra = {
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "epoch": epoch,
        "world_size": world_size,  # a resume must keep it: the global batch depends on it
    }
    state = make_checkpoint(cfg, raw, epoch, log.rows, best, extra)
    if decision.save_last:
        save_checkpoint(state, last_checkpoint(run_dir))
    if decision.save_best:
        save_checkpoint(state, best_checkpoint(run_dir))
