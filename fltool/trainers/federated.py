"""The federated round loop shared by fedavg, fedsgd and fedprox.

Per round: sample clients, run the client rule (via an engine), aggregate
w <- sum n_k/n * w_k, evaluate, log, checkpoint. Under `fltool launch` each rank
trains a slice of the cohort and the weighted sums are all-reduced (see `Comm`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from fltool.algorithms import rule_for, sample_clients, server_update
from fltool.algorithms.sampling import generator_for
from fltool.config import Config
from fltool.data import load_dataset, partition
from fltool.devices import keep_freed_host_memory
from fltool.distributed.comm import Comm
from fltool.trainers.progress import RunSummary, summarize, target_reached_at
from fltool.run.checkpoint import Checkpoint, make_checkpoint, save_checkpoint
from fltool.engines.sequential import ClientData, SequentialEngine, make_engine
from fltool.trainers.evaluate import evaluate
from fltool.run.metrics import MetricsLog
from fltool.run.rundir import best_checkpoint, last_checkpoint
from fltool.devices import resolve_device
from fltool.models.setup import seeded_model
from fltool.engines.vectorized.engine import VectorizedEngine


RoundCallback = Callable[[dict[str, Any]], None]


def build_clients(cfg: Config, device: torch.device) -> tuple[Any, list[ClientData]]:
    dataset = load_dataset(cfg.data, cfg.seed).to(device)
    parts = partition(dataset.train.y.cpu(), cfg.federated.num_clients, cfg.data, cfg.seed)
    clients = []
    for k, idx in enumerate(parts):
        idx = idx.to(device)
        clients.append(ClientData(k, dataset.train.x[idx], dataset.train.y[idx]))
    return dataset, clients


def train_federated(
    cfg: Config,
    run_dir: Path,
    on_round: RoundCallback | None = None,
    resume: Checkpoint | None = None,
    comm: Comm | None = None,
) -> RunSummary:
    t_setup = time.perf_counter()
    comm = comm or Comm()
    device = comm.device or resolve_device(cfg.device)
    keep_freed_host_memory(device)
    dataset, clients = build_clients(cfg, device)
    model = seeded_model(cfg, dataset, device)
    fed = cfg.federated
    engine = make_engine(fed.engine, model, cfg.seed, fed.max_parallel_clients, fed.cuda_graphs, fed.amp)
    rule = rule_for(cfg.mode, cfg.federated)
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())

    log = MetricsLog(run_dir)
    start, best = 1, None
    if resume is not None:
        model.load_state_dict(resume.model)
        start, best = resume.round + 1, resume.best_accuracy
        restore_engine(engine, resume.extra)
        log.rows = list(resume.metrics)
        if target_reached_at(log.rows, "round", cfg.eval.target_accuracy) is not None:
            start = cfg.federated.rounds + 1  # it stopped at its target: nothing left to train
    elapsed0 = log.rows[-1]["elapsed_s"] if log.rows else 0.0
    t0 = time.perf_counter()
    params = list(model.parameters())

    for r in range(start, cfg.federated.rounds + 1):
        t_round = time.perf_counter()
        sampled = sample_clients(len(clients), cfg.federated.fraction, generator_for(cfg.seed, "sample", r))
        mine = [clients[k] for k in sampled[comm.rank :: comm.world_size]]
        global_now = [p.detach() for p in params]
        result = engine.train_cohort(global_now, mine, rule, r)
        comm.all_reduce_sum([*result.weighted.sums, result.loss_sum])
        n_total = sum(clients[k].n for k in sampled)  # every rank knows every n_k
        result.weighted.total = float(n_total)
        with torch.no_grad():
            new = server_update(global_now, result.weighted.average(), cfg.federated.server_lr)
            torch._foreach_copy_(global_now, new)

        row: dict[str, Any] = {
            "round": r,
            "clients": len(sampled),
            "client_ids": sampled,
            "train_loss": result.loss_sum.item() / n_total,
            "test_loss": None,
            "test_accuracy": None,
        }
        final = r == cfg.federated.rounds
        if r % cfg.eval.every == 0 or final:
            # Every rank evaluates the same global model, so a target-accuracy stop is
            # decided identically everywhere without another collective.
            ev = evaluate(model, dataset.test, cfg.eval.batch_size, dataset.num_classes)
            row["test_loss"], row["test_accuracy"] = ev.loss, ev.accuracy
        row["wall_s"] = time.perf_counter() - t_round
        row["elapsed_s"] = elapsed0 + time.perf_counter() - t0
        row["bytes_up"] = row["bytes_down"] = len(sampled) * model_bytes

        reached = (
            cfg.eval.target_accuracy is not None
            and row["test_accuracy"] is not None
            and row["test_accuracy"] >= cfg.eval.target_accuracy
        )
        improved = row["test_accuracy"] is not None and (best is None or row["test_accuracy"] > best)
        best = row["test_accuracy"] if improved else best
        if comm.is_main:
            log.rows.append(row)
            if improved or r % cfg.output.checkpoint_every == 0 or final or reached:
                state = make_checkpoint(cfg, model, r, log.rows, best, engine_state(engine))
                if r % cfg.output.checkpoint_every == 0 or final or reached:
                    save_checkpoint(state, last_checkpoint(run_dir))
                if improved:
                    save_checkpoint(state, best_checkpoint(run_dir))
            # after the checkpoint: the metrics on disk never run ahead of it, and a
            # checkpoint carries its own rows, so an interrupt in between loses nothing
            log.flush()
            if on_round:
                on_round(row)
        else:
            log.rows.append(row)
        if reached:
            break
    comm.barrier()
    return summarize(run_dir, log.rows, "round", best, cfg.eval.target_accuracy, t_setup, t0)


def engine_state(engine: SequentialEngine | VectorizedEngine) -> dict[str, Any]:
    """What a resumed run needs to train as the uninterrupted one does: the chunk size
    the vectorized engine fell back to after running out of device memory (chunks set
    the float summation order). Under `launch`, rank 0's, which every rank takes on."""
    if not isinstance(engine, VectorizedEngine) or engine.oom_cap is None:
        return {}
    return {"chunk_cap": engine.oom_cap}


def restore_engine(engine: SequentialEngine | VectorizedEngine, extra: dict[str, Any]) -> None:
    if isinstance(engine, VectorizedEngine):
        engine.oom_cap = extra.get("chunk_cap")


