"""The federated round loop, the same for every algorithm.

Per round: sample clients; an engine trains this process's share of them, calling the
algorithm's client hooks and handing each upload to the aggregator; the aggregator
combines the cohort (all-reduced or all-gathered under `fltool launch`, see `Comm`);
new client state rows are stored; the algorithm's server update, through the server
optimizer, gives the next global model. Then evaluate, log and checkpoint, as
`Progress` decides. The algorithm's and server optimizer's state travel in the
checkpoint, so a resumed run continues bit for bit.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from fltool.algorithms import AGGREGATORS, ALGORITHMS, ATTACKS, COMPRESSORS, SERVER_OPTIMIZERS, Aggregate, ClientStore, FedAvg, Stacked, Upload
from fltool.algorithms.attacks import Attack
from fltool.algorithms.compression import Compressor
from fltool.algorithms.privacy import Privacy
from fltool.algorithms.sampling import cohort_size
from fltool.config import Config
from fltool.data import data_shape, load_dataset, natural_clients, partition
from fltool.devices import keep_freed_host_memory, resolve_device
from fltool.distributed.comm import Comm
from fltool.engines import ClientData, CohortJob, Engine, VectorizedEngine, make_engine
from fltool.errors import FltoolError, RoundAborted
from fltool.models import build_model
from fltool.models.setup import seeded_model
from fltool.run.checkpoint import Checkpoint, make_checkpoint, save_checkpoint
from fltool.run.metrics import MetricsLog, mark_stopped
from fltool.run.rundir import best_checkpoint, last_checkpoint
from fltool.trainers.availability import RoundPlan, malicious_for_run, plan_round, redraw_after_abort
from fltool.trainers.evaluate import evaluate
from fltool.trainers.privacy_budget import budget_for
from fltool.trainers.progress import Progress, RunSummary, all_finite, diverged, read_scalars, summarize
from fltool.trainers.rows import round_row, server_columns

RoundCallback = Callable[[dict[str, Any]], None]


class FederatedState:
    """Everything a round changes besides the model: the algorithm's server state, every
    client's state rows, the server optimizer (with its state), and, when a run uses
    them, the compressor's per-client rows (error feedback) and the DP clip norm."""

    def __init__(self, cfg: Config, algorithm: FedAvg, params: Sequence[Tensor], device: torch.device, noise_multiplier: float = 0.0) -> None:
        self.server = algorithm.init_server_state(params)
        self.clients = ClientStore(algorithm.init_client_state(params), cfg.federated.num_clients, device)
        self.optimizer = SERVER_OPTIMIZERS.get(cfg.server_optimizer.name)(cfg.server_optimizer, params)
        self.compressor: Compressor = COMPRESSORS.get(cfg.compression.name)(cfg.compression, cfg.seed)
        self.compressed = ClientStore(self.compressor.init_client_state(params), cfg.federated.num_clients, device)
        self.privacy = None if cfg.dp.mode == "none" else Privacy(cfg.dp, noise_multiplier, expected_cohort(cfg), cfg.seed, device)

    def parts(self) -> dict[str, dict[str, list[Tensor]]]:
        parts = {"server": self.server, "clients": self.clients.tables, "optimizer": self.optimizer.state}
        if self.compressed.tables:  # (optional parts: a checkpoint of a run without them still loads)
            parts["compression"] = self.compressed.tables
        if self.privacy is not None and self.privacy.dp.adaptive_clipping:
            parts["privacy"] = self.privacy.state
        return parts

    def state_dict(self) -> dict[str, Any]:
        saved = {name: on_host(part) for name, part in self.parts().items()}
        saved["clients"] = self.clients.state_dict()
        if "compression" in saved:
            saved["compression"] = self.compressed.state_dict()
        return saved

    def load_state_dict(self, saved: Any, where: str) -> None:
        """Restore from a checkpoint's extra['algorithm'] (checked by `check_algorithm_state`)."""
        check_algorithm_state_like(self.parts(), saved, where)
        if saved is None:
            return
        for name, live in self.parts().items():
            if name == "clients":
                self.clients.load_state_dict(saved[name])
            elif name == "compression":
                self.compressed.load_state_dict(saved[name])
            else:
                for k, ts in live.items():
                    for t, value in zip(ts, saved[name][k], strict=True):
                        t.copy_(value)


def expected_cohort(cfg: Config) -> float:
    """E[m], DP's fixed denominator: q K under Poisson sampling, else round(C K)."""
    fed = cfg.federated
    return fed.fraction * fed.num_clients if fed.sampling == "poisson" else float(cohort_size(fed.num_clients, fed.fraction))


def check_algorithm_state(cfg: Config, saved: Any, where: str) -> None:
    """Refuse, in one line, a checkpoint's extra['algorithm'] that is not exactly the
    state this run's algorithm and server optimizer keep (names, shapes, dtypes). Built
    on the meta device: nothing is allocated, and no data is needed."""
    shape, classes = data_shape(cfg.data)
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a Linear of zero inputs warns when built
        params = [p.detach() for p in build_model(cfg.model, shape, classes).parameters()]
        expected = FederatedState(cfg, build_algorithm(cfg), params, torch.device("meta")).parts()
    check_algorithm_state_like(expected, saved, where)


def check_algorithm_state_like(expected: dict[str, Any], saved: Any, where: str) -> None:
    if saved is None and not any(expected.values()):
        return  # a checkpoint from before algorithm state existed, of an algorithm that keeps none
    if not isinstance(saved, dict) or set(saved) != set(expected):
        raise FltoolError(f"{where}: checkpoint field 'extra[\"algorithm\"]' is not this run's algorithm state")
    for part, named in expected.items():
        got = saved[part]
        if not isinstance(got, dict) or set(got) != set(named) or any(
            not isinstance(got[k], list)
            or len(got[k]) != len(ts)
            or any(not isinstance(g, Tensor) or g.shape != t.shape or g.dtype != t.dtype for g, t in zip(got[k], ts))
            for k, ts in named.items()
        ):
            raise FltoolError(
                f"{where}: checkpoint field 'extra[\"algorithm\"][\"{part}\"]' does not match this run's algorithm state"
            )


def on_host(named: dict[str, list[Tensor]]) -> dict[str, list[Tensor]]:
    return {k: [t.detach().cpu().clone() for t in ts] for k, ts in named.items()}


def build_algorithm(cfg: Config) -> FedAvg:
    return ALGORITHMS.get(cfg.algorithm.name)(cfg.algorithm, cfg.federated)


def build_clients(cfg: Config, device: torch.device) -> tuple[Any, list[ClientData]]:
    dataset = load_dataset(cfg.data, cfg.seed).to(device)
    if cfg.data.partition == "natural":  # K comes from the data (see natural_clients)
        parts = natural_clients(cfg, dataset)
    else:
        parts = partition(dataset.train.y.cpu(), cfg.federated.num_clients, cfg.data, cfg.seed)
    clients = []
    for k, idx in enumerate(parts):
        idx = idx.to(device)
        clients.append(ClientData(k, dataset.train.x[idx], dataset.train.y[idx]))
    return dataset, clients


def train_round(
    engine: Engine,
    algorithm: FedAvg,
    state: FederatedState,
    global_params: list[Tensor],
    clients: Sequence[ClientData],
    round_: int,
    cfg: Config,
    comm: Comm,
    cohort: int,
    attack: Attack | None = None,
    malicious: Tensor | None = None,
) -> tuple[list[Tensor], Tensor, Tensor]:
    """One round of this process's `clients` (of a cohort of `cohort`): the new global
    model, the cohort's summed loss (sum_k n_k * mean minibatch cross-entropy) and the
    bytes its uploads took, encoded. With an `attack`, `malicious` (K,) bool marks whose
    uploads it corrupts.

    An upload's way to the aggregator: the attack (what a malicious client sends
    instead), local DP's clip and noise (on the client, before encoding), the
    compressor (what the server decodes), central DP's clip (on what the server
    received); the server's DP noise goes on the aggregate."""
    aggregator = AGGREGATORS.get(cfg.aggregator.name)(cfg.aggregator)
    if cfg.secagg.enabled:  # the mean, through secure aggregation (robust aggregators are refused at load)
        from fltool.algorithms.secagg.aggregator import SecureMeanAggregator

        aggregator = SecureMeanAggregator(cfg.secagg, cfg.seed, round_)
    new_rows: list[tuple[Tensor, Stacked]] = []
    compressed_rows: list[tuple[Tensor, Stacked]] = []
    bytes_up = torch.zeros((), dtype=torch.float64, device=global_params[0].device)
    privacy, compressor = state.privacy, state.compressor
    local_dp = privacy is not None and cfg.dp.mode == "local"
    noise_shares = None  # distributed DP: each client adds 1/t of the noise variance, t the fewest inputs unmasked
    if privacy is not None and privacy.distributed:
        from fltool.algorithms.secagg.aggregator import protocol_params

        noise_shares = protocol_params(cfg.secagg, cohort, round_).fewest_inputs

    def context_for(ids: list[int]) -> Stacked:
        return algorithm.client_context(state.server, state.clients.rows(ids), global_params)

    def send(ids: Tensor, upload: Upload) -> None:
        nonlocal bytes_up
        if local_dp:
            upload = privacy.client_side(ids, upload, round_)
        rows = state.compressed.rows(ids.tolist()) if state.compressed.tables else {}
        delta, rows, sizes = compressor.compress(ids, upload.delta, rows, round_)
        bytes_up = bytes_up + sizes.sum(dtype=torch.float64)
        if rows:
            compressed_rows.append((ids, rows))
        upload = Upload(delta=delta, weight=upload.weight, extras=upload.extras, state=upload.state)
        if privacy is not None and not local_dp:
            upload = privacy.client_side(ids, upload, round_, noise_shares)
        aggregator.add(ids, upload)

    def collect(ids: Tensor, upload: Upload) -> None:
        if upload.state:  # a client remembers its honest state, whatever it sends
            new_rows.append((ids, upload.state))
        if attack is not None and malicious is not None:
            ids, upload = attack.corrupt(ids, upload, malicious[ids])
        send(ids, upload)

    loss_sum = engine.train_cohort(global_params, clients, CohortJob(algorithm, round_, context_for, collect))
    held = attack.finish(comm) if attack is not None else None
    if held is not None:
        send(*held)
    aggregate: Aggregate = aggregator.reduce(comm, [loss_sum, bytes_up], cohort, cfg.federated.num_clients)
    if cfg.secagg.enabled:  # what went up: keys, encrypted shares, masked vectors
        bytes_up = torch.full_like(bytes_up, aggregator.bytes_up)
        state.secagg_metrics = aggregator.metrics()  # (read once by train_federated's row)
        if noise_shares is not None:  # the noise std the unmasked sum carries: z S sqrt(|U3| / t) >= z S
            state.secagg_metrics["dp_sum_noise_std"] = cfg.dp.clip_norm * privacy.z * (aggregate.clients / noise_shares) ** 0.5
    if new_rows:
        store_client_rows(state.clients, new_rows, comm)
    if compressed_rows:
        store_client_rows(state.compressed, compressed_rows, comm)
    with torch.no_grad():
        if privacy is not None:
            aggregate = privacy.server_side(aggregate, round_, comm)
        new, state.server = algorithm.server_update(global_params, aggregate, state.server, state.optimizer)
    return new, loss_sum, bytes_up


def round_clients(clients: Sequence[ClientData], plan: RoundPlan, attack: Attack | None, num_classes: int) -> list[ClientData]:
    """The clients that train this round, as they train: a straggler with its step cap,
    a malicious client with its poisoned labels."""
    out = []
    for k in plan.returned:
        client = clients[k]
        y = attack.poison_labels(client.y, num_classes) if attack is not None and k in plan.malicious else client.y
        out.append(ClientData(client.id, client.x, y, plan.stragglers.get(k)))
    return out


def malicious_mask(plan: RoundPlan, attack: Attack | None, num_clients: int, round_: int, device: torch.device) -> Tensor | None:
    """(K,) bool on the device, True for this round's attackers, so that the upload path
    picks a chunk's rows by indexing, without a host sync; starts the attack's round."""
    if attack is None:
        return None
    attack.start_round(round_, len(plan.returned), len(plan.malicious))
    mask = torch.zeros(num_clients, dtype=torch.bool)
    mask[plan.malicious] = True
    return mask.to(device)


def train_or_redraw(
    cfg: Config, round_: int, plan: RoundPlan, params: list[Tensor], engine: Engine, algorithm: FedAvg, state: FederatedState,
    clients: Sequence[ClientData], comm: Comm, attack: Attack | None, num_classes: int, run_malicious: list[int],
) -> tuple[RoundPlan, Tensor | None, Tensor | None]:
    """Train round `round_`'s draw `plan` into the global model `params` (in place): the
    plan that trained, its cohort's loss sum and bytes up (None, None: the round was
    skipped). A round that aborts (`RoundAborted`: a SecAgg round with too few live
    shareholders) keeps nothing, so the model and state are as before it; it is drawn
    again, skipped with a warning, or fails, as `redraw_after_abort` says."""
    while plan.returned and not plan.skipped:
        global_now = [p.detach() for p in params]
        mine = round_clients(clients, plan, attack, num_classes)[comm.rank :: comm.world_size]
        malicious = malicious_mask(plan, attack, len(clients), round_, global_now[0].device)
        try:
            new, loss_sum, bytes_up = train_round(engine, algorithm, state, global_now, mine, round_, cfg, comm, len(plan.returned), attack, malicious)
        except RoundAborted as error:
            again = redraw_after_abort(cfg, plan, [c.n for c in clients], round_, run_malicious)
            if again is None:
                warnings.warn(f"round {round_} skipped: {error}", stacklevel=1)
                return plan, None, None
            plan = again
            continue
        with torch.no_grad():
            torch._foreach_copy_(global_now, new)
        return plan, loss_sum, bytes_up
    return plan, None, None


def store_client_rows(store: ClientStore, new_rows: list[tuple[Tensor, Stacked]], comm: Comm) -> None:
    """Write the cohort's new state rows; under `launch`, every rank's, so that each rank
    keeps the whole table."""
    if comm.world_size == 1:  # nothing to gather: each chunk's rows go straight in, no joined copy
        for ids, rows in new_rows:
            store.write(ids, rows)
        return
    names = sorted(new_rows[0][1])
    ids = torch.cat([i for i, _ in new_rows])
    columns = [torch.cat(parts) for parts in zip(*(sum((rows[n] for n in names), []) for _, rows in new_rows), strict=True)]
    ids, *columns = comm.all_gather_rows([ids, *columns])
    widths = [len(store.tables[n]) for n in names]
    rows, at = {}, 0
    for name, width in zip(names, widths, strict=True):
        rows[name], at = columns[at : at + width], at + width
    store.write(ids, rows)


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
    algorithm = build_algorithm(cfg)
    attack: Attack | None = None if cfg.attack.name == "none" else ATTACKS.get(cfg.attack.name)(cfg.attack, cfg.seed)
    run_malicious = malicious_for_run(cfg)
    sizes = [c.n for c in clients]
    params = list(model.parameters())
    budget = budget_for(cfg)
    state = FederatedState(cfg, algorithm, [p.detach() for p in params], device, budget.noise_multiplier if budget else 0.0)
    model_bytes = sum(p.numel() * p.element_size() for p in params)

    log = MetricsLog(run_dir, tensorboard=cfg.output.tensorboard)
    progress = Progress(cfg)
    start = 1
    if resume is not None:
        model.load_state_dict(resume.model)
        restore_engine(engine, resume.extra)
        state.load_state_dict(resume.extra.get("algorithm"), str(last_checkpoint(run_dir)))
        progress.best = resume.best_accuracy
        log.rows = list(resume.metrics)
        if comm.is_main:
            # the checkpoint's rows are the truth: a kill between writing it and the
            # metrics files leaves those a round behind, even when nothing is left to train
            log.flush()
        start = progress.first(resume.round, log.rows)
    stopped = None
    if resume is not None and not all_finite(params).item():  # (one sync, at set-up)
        # a run that diverged stops again, training no NaN rounds, whatever its new round cap
        stopped, start = diverged("round", resume.round), fed.rounds + 1
    elapsed0 = log.rows[-1]["elapsed_s"] if log.rows else 0.0
    t0 = time.perf_counter()

    for r in range(start, fed.rounds + 1):
        if budget is not None and cfg.dp.max_epsilon is not None and budget.epsilon(r) > cfg.dp.max_epsilon:
            stopped = (
                f"privacy budget: round {r} would bring epsilon to {budget.epsilon(r):.4g}, over "
                f"dp.max_epsilon {cfg.dp.max_epsilon:g} (spent after round {r - 1}: {budget.epsilon(r - 1):.4g})"
            )
            mark_stopped(log, stopped, comm.is_main)
            break
        t_round = time.perf_counter()
        plan = plan_round(cfg, sizes, r, run_malicious)
        plan, loss_sum, bytes_up = train_or_redraw(
            cfg, r, plan, params, engine, algorithm, state, clients, comm, attack, dataset.num_classes, run_malicious
        )
        # the round's one host sync: its loss, its bytes and whether the new global model
        # is finite. Every rank holds the same global model, so under `launch` each one
        # decides a divergence stop identically, without a collective.
        loss, sent, finite = (None, 0.0, 1.0) if loss_sum is None else read_scalars(loss_sum, bytes_up, all_finite(params))
        if not finite:
            stopped = diverged("round", r)
        n_total = sum(clients[k].n for k in plan.returned)  # every rank knows every n_k
        row = round_row(cfg, r, plan, None if loss is None else loss / n_total, sent, model_bytes)
        if progress.evaluates(r, last=not finite):
            # Every rank evaluates the same global model, so a target-accuracy stop is
            # decided identically everywhere without another collective.
            ev = evaluate(model, dataset.test, cfg.eval.batch_size, dataset.num_classes)
            row["test_loss"], row["test_accuracy"] = ev.loss, ev.accuracy
        row["wall_s"] = time.perf_counter() - t_round
        row["elapsed_s"] = elapsed0 + time.perf_counter() - t0
        row.update(server_columns(cfg, r, state, budget))
        if not finite:
            row["stopped"] = stopped  # in the checkpoint's rows too: `fltool runs` reads it

        decision = progress.decide(r, row["test_accuracy"], last=not finite)  # (a diverged round: the last)
        log.rows.append(row)
        if comm.is_main:
            if decision.save_last:
                extra = {**engine_state(engine), "algorithm": state.state_dict()}
                save_checkpoint(make_checkpoint(cfg, model, r, log.rows, progress.best, extra), last_checkpoint(run_dir))
            if decision.save_best:
                # the model to evaluate, without the training state that only a resume
                # (from last.pt) reads: per-client tables (SCAFFOLD's c_i, top-k
                # residuals) reach gigabytes at K = 1,000 and would be written twice
                save_checkpoint(make_checkpoint(cfg, model, r, log.rows, progress.best), best_checkpoint(run_dir))
            # after the checkpoint: the metrics on disk never run ahead of it, and a
            # checkpoint carries its own rows, so an interrupt in between loses nothing
            log.flush()
            if on_round:
                on_round(row)
        if decision.stop:
            break
    comm.barrier()
    summary = summarize(run_dir, log.rows, "round", progress.best, cfg.eval.target_accuracy, t_setup, t0)
    summary.stopped = stopped
    return summary


def engine_state(engine: Engine) -> dict[str, Any]:
    """What a resumed run needs to train as the uninterrupted one does: the chunk size
    the vectorized engine fell back to after running out of device memory (chunks set
    the float summation order). Under `launch`, rank 0's, which every rank takes on."""
    if not isinstance(engine, VectorizedEngine) or engine.oom_cap is None:
        return {}
    return {"chunk_cap": engine.oom_cap}


def restore_engine(engine: Engine, extra: dict[str, Any]) -> None:
    if isinstance(engine, VectorizedEngine):
        engine.oom_cap = extra.get("chunk_cap")
