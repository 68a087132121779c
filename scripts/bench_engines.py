"""Time the textbook FedAvg loop against fltool's sequential and vectorized engines.

All engines run in one process on the same workload, clients and sampled cohorts.
Client-steps/s counts one local SGD step of one client as one client-step. On CPU the
engines' timed rounds are interleaved (round 1 of every engine, then round 2, ...), so a
shared machine's drift in speed falls on all of them alike, and each row also gives the
lowest and highest ratio of its single rounds against the textbook loop's round run
beside it; `--no-interleave` (the default on CUDA) times one engine after the other.

`--engines ... grad-only` adds a practical bound: a client-step's forward and backward
kernels alone, timed on one fixed batch (no data, update or aggregation), the fastest
of a few arrangements. Every engine's client-step runs those kernels and more, so on a
device where the kernels rather than the launches are the cost (a CPU), its ratio is
about as far as any engine built from PyTorch's kernels can go. `flop-bound` is the
hardware's ceiling: the client-step's matmul and convolution FLOPs at the device's
fp32 matmul peak (a 2048x2048 matmul, timed here), with everything else free.

Peak memory, over the engine's timed rounds, or when interleaved over one more, untimed,
round of each engine after them: on CUDA, torch.cuda.max_memory_allocated() (reset
before); on CPU (Linux), the peak resident set size minus the resident size before: the
kernel's high-water mark VmHWM is reset by writing 5 to /proc/self/clear_refs. Where that
reset is not possible it falls back to the growth of getrusage's ru_maxrss, which
shows 0 for an engine that stays below an earlier peak.

`ENGINE:bf16` (e.g. `vectorized:bf16`) runs an engine, or the textbook loop, with its
forward passes under bf16 autocast (`federated.amp: bf16`); its ratio is still against
the fp32 textbook loop, the reference.

The engines run a round as `fltool train` does (`train_round`: the algorithm's hooks,
the mean aggregator, the server optimizer), FedAvg with server sgd at lr 1 unless named.
`--algorithms` (default: scaffold fedadam) adds a row per algorithm for each vectorized
engine, `vectorized/scaffold`, and prints its client-steps/s against the same engine's
FedAvg (rounds side by side when interleaved); the target is >= 0.8x. FedAdam is FedAvg
with server Adam, one step a round, so it should match FedAvg; SCAFFOLD adds a gradient
term to every local step and keeps every client's control variate. `dp_central` and
`dp_local` are FedAvg under DP (z = 1, S = 1): the target there is that DP costs at
most 10% of a round (>= 0.91x).

`--robust` times the aggregators instead of the engines: for a cohort of 100 McMahan
CNN clients (MNIST shapes), each aggregator's `add` of every chunk (random updates of
the CNN's parameter shapes, in the chunks and memory layouts the vectorized engine
hands over) plus its `reduce`, against one vectorized local step of the same 100
clients (B=10, measured in the same process); it prints per aggregator the ratio
aggregation time / (one client-step per client per round), i.e. how many local steps
of every client the aggregation costs. Robust rules run at f = 10 (Bulyan: n >= 43),
trimmed_mean at beta = 0.1, norm_bounded at clip_norm = 1.

`--variant` switches the hand-batched step to another kernel arrangement for an A/B run
(the same math; see VARIANTS). `--profile N` profiles one more round of each engine and
prints its N most expensive ops (device time on CUDA, kernels inside CUDA graphs
included; CPU time otherwise).

    PYTHONPATH=. python scripts/bench_engines.py --workload 2nn --rounds 3 --device cpu
    PYTHONPATH=. python scripts/bench_engines.py --workload cnn --engines vectorized --profile 15
    PYTHONPATH=. python scripts/bench_engines.py --workload cnn --engines textbook textbook:bf16 vectorized vectorized:bf16
    PYTHONPATH=. python scripts/bench_engines.py --workload 2nn --engines vectorized --algorithms scaffold scaffold1 fednova fedadam
    PYTHONPATH=. python scripts/bench_engines.py --robust
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import gc
import math
import resource
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.flop_counter import FlopCounterMode

from fltool.algorithms import LocalRule, Upload
from fltool.algorithms.client_state import table_bytes
from fltool.algorithms.sampling import generator_for, sample_clients
from fltool.algorithms.scaffold import ScaffoldConfig
from fltool.algorithms.server_optimizers import AdaptiveConfig, SGDConfig
from fltool.config.registry import AGGREGATORS
from fltool.config.schema import AlgorithmConfig, Config, DataConfig, DPConfig, FederatedConfig, SyntheticConfig
from fltool.data import load_dataset
from fltool.devices import autocast_for, keep_freed_host_memory
from fltool.distributed.comm import Comm
from fltool.engines import ClientData, make_engine
from fltool.engines.base import CohortJob
from fltool.engines.vectorized import batched_nets
from fltool.engines.vectorized.batched_nets import make_batched_apply, supports
from fltool.models import build_model
from fltool.trainers.federated import FederatedState, build_algorithm, train_round


@dataclass(frozen=True)
class Workload:
    model: str
    num_clients: int
    per_client: int
    shape: tuple[int, int, int]
    fraction: float
    epochs: int
    batch_size: int
    lr: float = 0.1
    server_lr: float = 1.0


WORKLOADS = {
    "2nn": Workload("mlp", 100, 600, (1, 28, 28), 0.1, 1, 10),  # McMahan 2NN
    "cnn": Workload("cnn", 100, 600, (1, 28, 28), 0.1, 5, 10),  # McMahan CNN
    "2nn_1000": Workload("mlp", 1000, 60, (1, 28, 28), 1.0, 1, 10),  # 1,000-client cohort
    "cnn_1000": Workload("cnn", 1000, 10, (1, 28, 28), 1.0, 1, 10),  # 1,000 CNN clients: needs chunking
    "cifar": Workload("cnn_cifar", 1000, 50, (3, 32, 32), 0.05, 1, 10),  # pfl-research CIFAR-10
    "resnet_gn": Workload("resnet8_gn", 1000, 50, (3, 32, 32), 0.05, 1, 10),  # ResNet-8 + GroupNorm, CIFAR-10 shape
}


ENGINES = ["textbook", "sequential", "vectorized", "grad-only", "flop-bound"]

# Algorithms the vectorized engine also runs with `--algorithms` (each its own row,
# `vectorized/NAME`, and its rate against the same engine's FedAvg): the client algorithm
# and the server optimizer, as a config's `algorithm` and `server_optimizer` sections.
# FedAdam is FedAvg's clients with Adam on the server (Reddi et al. 2021), once a round.
ALGORITHMS = {
    "fedavg": lambda w: (AlgorithmConfig(name="fedavg"), SGDConfig(name="sgd", lr=w.server_lr)),
    "scaffold": lambda w: (ScaffoldConfig(name="scaffold"), SGDConfig(name="sgd", lr=w.server_lr)),
    "scaffold1": lambda w: (ScaffoldConfig(name="scaffold", option=1), SGDConfig(name="sgd", lr=w.server_lr)),
    "fednova": lambda w: (AlgorithmConfig(name="fednova"), SGDConfig(name="sgd", lr=w.server_lr)),
    "fedadam": lambda w: (AlgorithmConfig(name="fedavg"), AdaptiveConfig(name="adam")),
    "dp_central": lambda w: (AlgorithmConfig(name="fedavg"), SGDConfig(name="sgd", lr=w.server_lr)),
    "dp_local": lambda w: (AlgorithmConfig(name="fedavg"), SGDConfig(name="sgd", lr=w.server_lr)),
}
# FedAvg under DP (issue 20): the mechanism on every upload and on the aggregate
DP_SETTINGS = {
    "dp_central": DPConfig(mode="central", clip_norm=1.0, noise_multiplier=1.0),
    "dp_local": DPConfig(mode="local", clip_norm=1.0, noise_multiplier=1.0),
}
ALGORITHM_TARGET = 0.8  # of vectorized FedAvg's client-steps/s, for every other algorithm
DP_TARGET = 1 / 1.1  # DP may cost at most 10% of a round
# client state (SCAFFOLD's c_i for every client) that a CPU run may hold; more is skipped
MAX_HOST_STATE_BYTES = 4 * 2**30

VARIANTS = {
    "batched-linear": "every dense layer as BatchedLinear, on every device (default: CPU, >= 1M weights a client)",
    "channels-last": "grouped convolutions in channels-last layout on every device (default: CPU only)",
}


def use_variants(names: list[str]) -> None:
    """Swap the hand-batched step's per-device choices for this process (see VARIANTS).
    They pick kernels and memory layouts, not the math: tests check both forms equal."""
    if "batched-linear" in names:
        batched_nets.uses_batched_linear = lambda x, w: True
    if "channels-last" in names:
        batched_nets.conv_layout = lambda device: torch.channels_last


def make_clients(w: Workload, data: str, device: torch.device) -> list[ClientData]:
    n = w.num_clients * w.per_client
    if data == "mnist" and w.shape == (1, 28, 28):
        train = load_dataset(DataConfig(dataset="mnist"), 0).train
        x, y = train.x[:n], train.y[:n]
    else:
        cfg = SyntheticConfig(train_size=n, test_size=1, shape=list(w.shape))
        train = load_dataset(DataConfig(dataset="synthetic", synthetic=cfg), 0).train
        x, y = train.x, train.y
    x, y = x.to(device), y.to(device)
    k = w.per_client
    return [ClientData(i, x[i * k : (i + 1) * k], y[i * k : (i + 1) * k]) for i in range(w.num_clients)]


def textbook_round(w: Workload, global_model: torch.nn.Module, clients: list[ClientData], amp: str = "none") -> None:
    """FedAvg as the seed article writes it: a fresh model, optimizer and DataLoader per
    client (amp "bf16": its forward under bf16 autocast, as PyTorch's AMP recipe does)."""
    global_state = global_model.state_dict()
    states, sizes = [], []
    for client in clients:
        model = build_model(w.model, w.shape, 10).to(client.x.device)
        model.load_state_dict(global_state)
        model.train()
        opt = torch.optim.SGD(model.parameters(), lr=w.lr)
        loader = DataLoader(TensorDataset(client.x, client.y), batch_size=w.batch_size, shuffle=True)
        for _ in range(w.epochs):
            for xb, yb in loader:
                opt.zero_grad()
                with autocast_for(amp, xb.device):
                    loss = F.cross_entropy(model(xb), yb)
                loss.backward()
                opt.step()
        states.append(model.state_dict())
        sizes.append(client.n)
    total = sum(sizes)
    avg = {key: sum(s[key] * (n / total) for s, n in zip(states, sizes)) for key in global_state}
    global_model.load_state_dict(avg)


def round_config(w: Workload, algorithm: str) -> Config:
    """The config a trainer would run the workload's round with (what `train_round` reads)."""
    algo, server = ALGORITHMS[algorithm](w)
    federated = FederatedConfig(
        num_clients=w.num_clients, fraction=w.fraction, local_epochs=w.epochs, batch_size=w.batch_size, lr=w.lr
    )
    return Config(federated=federated, algorithm=algo, server_optimizer=server, dp=DP_SETTINGS.get(algorithm, DPConfig()))


def make_engine_round(engine, w: Workload, global_model: torch.nn.Module, algorithm: str) -> Callable[[list[ClientData], int], None]:
    """One round as `fltool train` runs it (`train_round`): the engine trains the cohort
    through the algorithm's hooks, the mean aggregator combines the uploads, new client
    state rows are stored, and the algorithm's server update steps the global model."""
    cfg = round_config(w, algorithm)
    params = [p.detach() for p in global_model.parameters()]
    algo = build_algorithm(cfg)
    state = FederatedState(cfg, algo, params, params[0].device, cfg.dp.noise_multiplier or 0.0)
    comm = Comm()

    def run(clients: list[ClientData], r: int) -> None:
        new, _, _ = train_round(engine, algo, state, params, clients, r, cfg, comm, len(clients))
        with torch.no_grad():
            torch._foreach_copy_(params, new)

    return run


def gradient_only(w: Workload, model: torch.nn.Module, chunk: int, device: torch.device) -> tuple[float, str]:
    """Seconds per client-step of the forward and backward kernels alone, and which
    arrangement was fastest: no data loading, optimizer, update or aggregation.

    Every engine's client-step runs at least one forward and backward of the model, so
    this bounds what the engines can reach with the arrangements tried: one client at a
    time (default and channels-last layout), and `chunk` clients hand-batched."""
    x = torch.randn(w.batch_size, *w.shape, device=device)
    y = torch.randint(0, 10, (w.batch_size,), device=device)
    params = list(model.parameters())
    candidates: dict[str, Callable[[], object]] = {
        "one client": lambda: torch.autograd.grad(F.cross_entropy(model(x), y), params)
    }
    if len(w.shape) == 3:
        xc = x.contiguous(memory_format=torch.channels_last)
        mc = copy.deepcopy(model).to(memory_format=torch.channels_last)
        candidates["one client, channels-last"] = lambda: torch.autograd.grad(
            F.cross_entropy(mc(xc), y), list(mc.parameters()))
    if supports(model):
        apply = make_batched_apply(model)
        stacked = [p.detach().unsqueeze(0).repeat(chunk, *[1] * p.dim()).requires_grad_(True) for p in params]
        xs, ys = x.expand(chunk, *x.shape).contiguous(), y.expand(chunk, -1).reshape(-1)
        candidates[f"{chunk} clients batched"] = lambda: torch.autograd.grad(
            F.cross_entropy(apply(stacked, xs).flatten(0, 1), ys, reduction="sum"), stacked)
    best, label, reps = math.inf, "", 10
    for name, step in candidates.items():
        per_step = chunk if name.endswith("batched") else 1
        step()
        for _ in range(3):  # best of 3 blocks: the least disturbed
            sync(device)
            t0 = time.perf_counter()
            for _ in range(reps):
                step()
            sync(device)
            seconds = (time.perf_counter() - t0) / (reps * per_step)
            if seconds < best:
                best, label = seconds, name
    return best, label


def flop_bound(w: Workload, model: torch.nn.Module, device: torch.device) -> tuple[float, str]:
    """Seconds per client-step if its forward and backward matmul and convolution FLOPs
    (counted by FlopCounterMode, as PyTorch's kernels compute them) ran at this device's
    fp32 matmul peak, and memory traffic, elementwise work, the update and Python cost
    nothing. No engine that computes the same FLOPs in fp32 (direct or GEMM convolution,
    not Winograd or FFT) can exceed it on a CPU. (cuDNN convolutions run in TF32 by
    default, so on CUDA it is no ceiling; small GPU steps are launch-bound anyway.)"""
    x = torch.randn(w.batch_size, *w.shape, device=device)
    y = torch.randint(0, 10, (w.batch_size,), device=device)
    with FlopCounterMode(display=False) as counter:
        torch.autograd.grad(F.cross_entropy(model(x), y), list(model.parameters()))
    flops = counter.get_total_flops()
    a, b = torch.randn(2048, 2048, device=device), torch.randn(2048, 2048, device=device)
    best = math.inf
    for _ in range(5):
        sync(device)
        t0 = time.perf_counter()
        for _ in range(3):
            a @ b
        sync(device)
        best = min(best, (time.perf_counter() - t0) / 3)
    peak = 2 * 2048**3 / best
    return flops / peak, f"{flops / 1e6:.1f} MFLOP a client-step at {peak / 1e9:.0f} GFLOP/s"


def profile_round(run_round: Callable[[int], None], r: int, device: torch.device, top: int) -> None:
    """One more round under torch.profiler: its `top` ops by self time on the device."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        run_round(r)
        sync(device)
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=top), flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _status_mib(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024  # kB
    raise KeyError(field)


def reset_peak_rss() -> float | None:
    """Reset the kernel's peak-RSS mark; return the current RSS (MiB), or None if unsupported.

    Memory an earlier engine freed first goes back to the OS (glibc's malloc_trim):
    otherwise the next engine reuses it without growing its RSS and shows 0."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _status_mib("VmRSS")
    except (OSError, KeyError):
        return None


def peak_rss_mib(baseline: float | None) -> float:
    if baseline is not None:
        return _status_mib("VmHWM") - baseline
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


@dataclass
class Timed:
    """An engine's timed rounds: their total seconds and, when timed one by one
    (interleaved), each round's; and its peak memory (MiB)."""

    name: str
    run_round: Callable[[int], None] | None
    rounds: int = 0
    total_s: float = 0.0
    round_s: list[float] = field(default_factory=list)
    peak_mib: float = 0.0

    @property
    def seconds_per_round(self) -> float:
        return self.total_s / self.rounds


def peak_during(run: Callable[[], None], device: torch.device) -> float:
    """Peak memory (MiB) while `run` runs: CUDA's allocated peak, or on CPU the growth of
    the resident set over where it started (freed memory first handed back to the OS)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    baseline = reset_peak_rss()
    rss0 = peak_rss_mib(baseline) if baseline is None else 0.0
    run()
    sync(device)
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return peak_rss_mib(baseline) - rss0


def time_alone(timed: Timed, rounds: int, device: torch.device) -> None:
    """One warm-up round (0), then rounds 1..rounds timed together (no sync between them,
    so the host may prepare a round while the device runs the last), and the peak memory
    over them."""
    timed.run_round(0)
    sync(device)

    def timed_rounds() -> None:
        t0 = time.perf_counter()
        for r in range(1, rounds + 1):
            timed.run_round(r)
        sync(device)
        timed.rounds, timed.total_s = rounds, time.perf_counter() - t0

    timed.peak_mib = peak_during(timed_rounds, device)


def time_interleaved(engines: list[Timed], rounds: int, device: torch.device) -> None:
    """One warm-up round (0) of every engine, then rounds 1..rounds, each running every
    engine once, the order rotating by one per round: on a shared VM whose speed drifts
    by tens of percent within minutes, that keeps the drift out of the ratios, which
    then compare rounds run side by side.

    The peak memory comes from one more round of each engine, untimed: measuring it
    hands freed memory back to the OS first (`reset_peak_rss`), and the page faults that
    costs would fall on the timed rounds. (On CUDA that peak includes the other engines'
    memory, which stays allocated.)"""
    for timed in engines:
        timed.run_round(0)
        sync(device)
    for r in range(1, rounds + 1):
        shift = (r - 1) % len(engines)
        for timed in engines[shift:] + engines[:shift]:
            t0 = time.perf_counter()
            timed.run_round(r)
            sync(device)
            timed.round_s.append(time.perf_counter() - t0)
    for timed in engines:
        timed.rounds, timed.total_s = rounds, sum(timed.round_s)
        timed.peak_mib = peak_during(lambda: timed.run_round(rounds + 1), device)


def make_runner(
    engine_name: str, w: Workload, cohorts: dict[int, list[ClientData]], args: argparse.Namespace, device: torch.device
) -> Callable[[int], None]:
    """A fresh global model (seed 0) and a function that trains round r of it."""
    torch.manual_seed(0)
    model = build_model(w.model, w.shape, 10).to(device)
    engine_spec, _, algorithm = engine_name.partition("/")
    base, _, amp = engine_spec.partition(":")
    if base == "textbook":
        return lambda r: textbook_round(w, model, cohorts[r], amp or "none")
    engine = make_engine(base, model, 0, args.max_parallel_clients, args.cuda_graphs, amp or "none")
    run_round = make_engine_round(engine, w, model, algorithm or "fedavg")
    return lambda r: run_round(cohorts[r], r)


def with_algorithms(names: list[str], algorithms: list[str], w: Workload, device: torch.device) -> list[str]:
    """The engines to time: each vectorized one (fp32 or bf16) followed by the same
    engine running each other algorithm, `vectorized/scaffold`. An algorithm with
    per-client state too large for the host is left out, with a note."""
    out = []
    for name in names:
        out.append(name)
        if name.partition(":")[0] != "vectorized":
            continue
        for algorithm in algorithms:
            if algorithm == "fedavg":
                continue
            cfg = round_config(w, algorithm)
            model = build_model(w.model, w.shape, 10)
            state = build_algorithm(cfg).init_client_state([p.detach() for p in model.parameters()])
            size = table_bytes(state, w.num_clients)
            if device.type == "cpu" and size > MAX_HOST_STATE_BYTES:
                print(f"({name}/{algorithm} skipped: its client state takes {size / 2**30:.1f} GiB)")
                continue
            out.append(f"{name}/{algorithm}")
    return out


def print_algorithm_ratios(timed: list[Timed], steps_per_round: float) -> None:
    """Every other algorithm's client-steps/s on the vectorized engine against the same
    engine's FedAvg (and, interleaved, the range over single rounds side by side)."""
    by_name = {t.name: t for t in timed}
    lines = []
    for t in timed:
        engine, _, algorithm = t.name.partition("/")
        base = by_name.get(engine)
        if not algorithm or base is None:
            continue
        ratio = base.seconds_per_round / t.seconds_per_round
        spread = ""
        if t.round_s and base.round_s:
            ratios = sorted(a / b for a, b in zip(base.round_s, t.round_s, strict=True))
            spread = f" (rounds {ratios[0]:.2f}-{ratios[-1]:.2f})"
        target = DP_TARGET if algorithm in DP_SETTINGS else ALGORITHM_TARGET
        verdict = "ok" if ratio >= target else "BELOW"
        lines.append(f"  {algorithm:<10} {ratio:.2f}x {engine} FedAvg{spread}  target {target:.2f}x  {verdict}")
    if lines:
        print("client-steps/s against the same engine's FedAvg:")
        print("\n".join(lines), flush=True)


def print_row(timed: Timed, steps_per_round: float, ref: Timed | None, width: int = 15) -> None:
    """Its rate and the ratio against the textbook loop; with rounds timed side by side
    (interleaved), also the lowest and highest ratio of single rounds."""
    seconds = timed.seconds_per_round
    ratio, spread = "-", ""
    if ref is not None:
        ratio = f"{ref.seconds_per_round / seconds:.2f}"
        if timed is not ref and timed.round_s and ref.round_s:
            ratios = sorted(a / b for a, b in zip(ref.round_s, timed.round_s, strict=True))
            spread = f"   {ratios[0]:.2f}-{ratios[-1]:.2f}"
    print(f"{timed.name:<{width}} {steps_per_round / seconds:>15,.0f} {seconds:>10.3f} {max(0.0, timed.peak_mib):>10.0f} "
          f"{ratio:>11}{spread}", flush=True)


def print_bound(
    engine_name: str, w: Workload, cohorts: dict[int, list[ClientData]], args: argparse.Namespace,
    device: torch.device, steps_per_round: float, ref: Timed | None, width: int = 15,
) -> None:
    torch.manual_seed(0)
    model = build_model(w.model, w.shape, 10).to(device)
    if engine_name == "grad-only":
        chunk = make_engine("vectorized", model, 0, args.max_parallel_clients, False).chunk_size(
            [p.detach() for p in model.parameters()], cohorts[1], LocalRule(w.epochs, w.batch_size, w.lr))
        per_step, fastest = gradient_only(w, model, chunk, device)
        detail = f"forward+backward alone, fastest: {fastest}"
    else:
        per_step, flops = flop_bound(w, model, device)
        detail = f"matmul/conv FLOPs at the fp32 matmul peak: {flops}"
    ratio = f"{ref.seconds_per_round / (per_step * steps_per_round):.2f}" if ref else "-"
    print(f"{engine_name:<{width}} {1 / per_step:>15,.0f} {per_step * steps_per_round:>10.3f} {'-':>10} {ratio:>11}"
          f"   ({detail})", flush=True)


def profile_engine(timed: Timed, args: argparse.Namespace, device: torch.device) -> None:
    if args.profile:
        print(f"-- {timed.name}: one round profiled, top {args.profile} ops")
        profile_round(timed.run_round, args.rounds + 1, device, args.profile)


def bench(name: str, w: Workload, args: argparse.Namespace, device: torch.device) -> None:
    clients = make_clients(w, args.data, device)
    cohorts = {
        r: [clients[k] for k in sample_clients(w.num_clients, w.fraction, generator_for(0, "sample", r))]
        for r in range(args.rounds + 2)  # the last one untimed: interleaved runs' peak memory, --profile
    }
    steps = sum(w.epochs * math.ceil(c.n / w.batch_size) for r in range(1, args.rounds + 1) for c in cohorts[r])
    steps_per_round = steps / args.rounds
    interleave = args.interleave if args.interleave is not None else device.type == "cpu"
    print(
        f"\n== {name}: {w.model}, {w.num_clients} clients x {w.per_client}, cohort {len(cohorts[1])}, "
        f"E={w.epochs}, B={w.batch_size}, {steps_per_round:.0f} client-steps/round, {args.rounds} rounds, {device}"
        + (", engines interleaved round by round" if interleave else "")
    )
    names = with_algorithms([e for e in args.engines if e not in ("grad-only", "flop-bound")], args.algorithms, w, device)
    width = max(15, *(len(e) for e in names))
    header = f"{'engine':<{width}} {'client-steps/s':>15} {'s/round':>10} {'peak MiB':>10} {'x textbook':>11}"
    if interleave:
        timed = [Timed(e, make_runner(e, w, cohorts, args, device)) for e in names]
        time_interleaved(timed, args.rounds, device)
        ref = next((t for t in timed if t.name == "textbook"), None)
        print(header + ("   rounds' ratios" if ref else ""))
        for t in timed:
            print_row(t, steps_per_round, ref, width)
    else:
        # one engine at a time, each released before the next: on CUDA a peak is absolute
        print(header)
        timed, ref = [], None
        for e in names:
            t = Timed(e, make_runner(e, w, cohorts, args, device))
            time_alone(t, args.rounds, device)
            ref = t if e == "textbook" else ref
            print_row(t, steps_per_round, ref, width)
            profile_engine(t, args, device)
            t.run_round = None
            timed.append(t)
    for e in args.engines:
        if e in ("grad-only", "flop-bound"):
            print_bound(e, w, cohorts, args, device, steps_per_round, ref, width)
    print_algorithm_ratios(timed, steps_per_round)
    if interleave:
        for t in timed:
            profile_engine(t, args, device)


# --robust: 100 CNN clients of 10 examples, all in the cohort, one local step each (E=1, B=10)
ROBUST_WORKLOAD = Workload("cnn", 100, 10, (1, 28, 28), 1.0, 1, 10)
ROBUST_AGGREGATORS = {
    "mean": {},
    "median": {},
    "trimmed_mean": {"beta": 0.1},
    "krum": {"f": 10},
    "multikrum": {"f": 10},
    "bulyan": {"f": 10},
    "norm_bounded": {"clip_norm": 1.0},
}


def best_of(run: Callable[[], object], device: torch.device, reps: int = 3) -> float:
    """Seconds of the fastest of `reps` runs after one warm-up: the least disturbed."""
    run()
    sync(device)
    best = math.inf
    for _ in range(reps):
        t0 = time.perf_counter()
        run()
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return best


def bench_robust(args: argparse.Namespace, device: torch.device) -> None:
    """Each aggregator's add (chunk by chunk) + reduce against one vectorized local step
    of the same cohort (see the module docstring, `--robust`)."""
    w = ROBUST_WORKLOAD
    clients = make_clients(w, "synthetic", device)
    torch.manual_seed(0)
    model = build_model(w.model, w.shape, 10).to(device)
    params = [p.detach() for p in model.parameters()]
    algorithm = build_algorithm(round_config(w, "fedavg"))
    engine = make_engine("vectorized", model, 0, args.max_parallel_clients, args.cuda_graphs)
    chunks: list[tuple[torch.Tensor, Upload]] = []
    timed_job = CohortJob(algorithm, 1, lambda ids: {}, lambda ids, upload: None)  # the step and the deltas
    step_s = best_of(lambda: engine.train_cohort(params, clients, timed_job), device)
    engine.train_cohort(params, clients, CohortJob(algorithm, 1, lambda ids: {}, lambda *sent: chunks.append(sent)))
    # random updates in the engine's chunks and memory layouts (empty_like keeps strides)
    g = torch.Generator(device=device).manual_seed(0)
    sent = [(ids, Upload(delta=[torch.empty_like(d).normal_(generator=g) for d in up.delta], weight=up.weight))
            for ids, up in chunks]
    size = sum(p.numel() for p in params)
    print(f"\n== robust: {w.model}, a cohort of {w.num_clients} clients, {size:,} parameters, chunks of "
          f"{[len(ids) for ids, _ in sent]}, {device}")
    print(f"one vectorized local step of the {w.num_clients} clients (B={w.batch_size}): {step_s:.3f} s")
    print(f"{'aggregator':<14} {'add+reduce s':>13} {'peak MiB':>10} {'x client-step':>14}")
    for name, settings in ROBUST_AGGREGATORS.items():
        config = AGGREGATORS.config_class(name)(name=name, **settings)

        def aggregate() -> None:
            agg = AGGREGATORS.get(name)(config)
            for ids, upload in sent:
                agg.add(ids, upload)
            agg.reduce(Comm(), [], w.num_clients, w.num_clients)

        seconds = best_of(aggregate, device)
        peak = peak_during(aggregate, device)
        print(f"{name:<14} {seconds:>13.3f} {max(0.0, peak):>10.0f} {seconds / step_s:>14.2f}", flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workload", choices=[*WORKLOADS, "all"], default="all")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds per engine (after 1 warm-up round)")
    parser.add_argument("--data", choices=["synthetic", "mnist"], default="synthetic")
    parser.add_argument(
        "--engines", nargs="+", choices=[*ENGINES, *(f"{e}:bf16" for e in ENGINES[:3])],
        default=["textbook", "sequential", "vectorized"],
        help="grad-only: the forward and backward kernels alone, a bound for every engine; "
        "flop-bound: the matmul/conv FLOPs at the device's fp32 matmul peak, a bound for any fp32 engine; "
        "ENGINE:bf16: with its forward passes under bf16 autocast (ratios stay against the fp32 textbook loop)",
    )
    parser.add_argument(
        "--algorithms", nargs="*", choices=list(ALGORITHMS), default=["scaffold", "fedadam"],
        help="also time the vectorized engine running these (rows vectorized/NAME), each against its FedAvg "
        f"(target: >= {ALGORITHM_TARGET}x); fedadam: FedAvg with server Adam; dp_central, dp_local: FedAvg under DP (target >= 0.91x); none: pass the flag alone",
    )
    parser.add_argument("--max-parallel-clients", type=int, default=None, help="vectorized chunk size")
    parser.add_argument(
        "--cuda-graphs", action=argparse.BooleanOptionalAction, default=True, help="vectorized: replay steps as CUDA graphs"
    )
    parser.add_argument(
        "--interleave", action=argparse.BooleanOptionalAction, default=None,
        help="run each timed round of every engine in turn (default: on CPU, whose VM speed drifts), "
        "not all rounds of one engine before the next (default on CUDA: its peak memory is absolute)",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--variant", nargs="+", choices=list(VARIANTS), default=[],
                        help="; ".join(f"{k}: {v}" for k, v in VARIANTS.items()))
    parser.add_argument("--robust", action="store_true",
                        help="time the aggregators (add + reduce of a 100-client CNN cohort) against one vectorized "
                        "local step of the same clients, instead of the engines")
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="after timing, profile one more round of each engine and print its N costliest ops")
    args = parser.parse_args(argv)
    use_variants(args.variant)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    # as fltool's trainers do on CPU; every engine here, the textbook loop too, runs with it
    kept = keep_freed_host_memory(device)
    print(f"malloc keeps freed memory: {kept}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, python {sys.version.split()[0]}"
          + (f", variants: {' '.join(args.variant)}" if args.variant else ""))
    if args.robust:
        bench_robust(args, device)
        return
    for name in WORKLOADS if args.workload == "all" else [args.workload]:
        bench(name, WORKLOADS[name], args, device)


if __name__ == "__main__":
    main()
