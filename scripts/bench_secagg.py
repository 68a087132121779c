"""Per-round cost of secure aggregation: SecAgg+ (k-regular graph) vs SecAgg (complete
graph) vs no secure aggregation, for cohorts of 10, 100 and 1,000 clients with the 2NN
(199,210 parameters) and the CNN (1,663,370), and 0/10/30% of clients dropping after
sharing keys (the costly case: the server rebuilds their pairwise masks).

Updates are random integers (the protocol's cost does not depend on them); one round of
`fltool.algorithms.secagg.run_round` is timed, client work (all clients' stages, summed,
shown per client) apart from the server's; bytes are averaged over the clients that
sent their masked input. Bytes per client are what it sends (up) and
receives (down) through the server: keys, encrypted shares, the masked vector (uint32),
the survivor list and revealed shares. "none" uploads the float32 update and the server
sums. The bar from issue 21: SecAgg+ for a 10-client 2NN round costs no more than the
round's local training, timed here with bench_engines' `make_engine_round` (FedAvg, 10
clients x 600 synthetic MNIST-shaped examples, E=1, B=10, sequential engine).

Large settings are capped by flags (the complete graph is n^2 PRG expansions):
--max-complete (default 100) and --max-cnn (default 100) clients.

    OMP_NUM_THREADS=1 python scripts/bench_secagg.py [--models 2nn cnn] [--cohorts 10 100 1000]
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import sys
import time
from pathlib import Path

import torch

from fltool.algorithms.secagg import SecAggAbort, SecAggParams, default_neighbours, run_round

PARAMS = {"2nn": 199_210, "cnn": 1_663_370}
REPO = Path(__file__).resolve().parents[1]


def threshold(k: int) -> int:
    """A third of the k+1 shareholders: survives 30% random dropout in every
    neighbourhood with overwhelming probability (a majority does not at k ~ 20-30)."""
    return max(2, math.ceil((k + 1) / 3))


def secagg_round(p: int, n: int, graph: str, dropout: float) -> dict[str, float]:
    k = n - 1 if graph == "complete" else default_neighbours(n)
    x = torch.randint(0, 2**22 + 1, (p,))
    gone = set(range(round(n * dropout)))  # which ones does not matter: the graph is random
    params = SecAggParams(neighbours=k, threshold=threshold(k))
    try:
        r = run_round({u: (lambda: x) for u in range(n)}, params, drop={"masked_input": gone}, keep_vectors=False)
    except SecAggAbort:
        return {"k": k, "aborted": 1}
    client = sum(r.client_seconds.values()) / n
    up = sum(r.transcript.up[u] for u in r.contributors) / len(r.contributors)  # per client that finished
    down = sum(r.transcript.down[u] for u in r.contributors) / len(r.contributors)
    return {"k": k, "client_s": client, "server_s": r.server_seconds, "up": up, "down": down,
            "total_s": sum(r.client_seconds.values()) + r.server_seconds}


def plain_round(p: int, n: int, dropout: float) -> dict[str, float]:
    xs = [torch.randn(p) for _ in range(min(n, 10))]
    start = time.perf_counter()
    total = torch.zeros(p)
    for i in range(n - round(n * dropout)):
        total.add_(xs[i % len(xs)])
    server = time.perf_counter() - start
    return {"k": 0, "client_s": 0.0, "server_s": server, "up": 4 * p, "down": 0, "total_s": server}


def local_training_seconds() -> float:
    """One FedAvg round of 10 2NN clients, as `fltool train` runs it (bench_engines)."""
    spec = importlib.util.spec_from_file_location("bench_engines", REPO / "scripts" / "bench_engines.py")
    bench = importlib.util.module_from_spec(spec)
    sys.modules["bench_engines"] = bench
    spec.loader.exec_module(bench)
    from fltool.engines import make_engine
    from fltool.models import build_model

    w = bench.Workload("mlp", 10, 600, (1, 28, 28), 1.0, 1, 10)
    device = torch.device("cpu")
    clients = bench.make_clients(w, "synthetic", device)
    torch.manual_seed(0)
    model = build_model(w.model, w.shape, 10).to(device)
    run = bench.make_engine_round(make_engine("sequential", model, 0, None, False), w, model, "fedavg")
    run(clients, 0)  # warm-up
    times = []
    for r in range(1, 4):
        start = time.perf_counter()
        run(clients, r)
        times.append(time.perf_counter() - start)
    return min(times)


def fmt_bytes(b: float) -> str:
    return f"{b / 2**20:.2f} MiB" if b >= 2**20 else f"{b / 2**10:.1f} KiB"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["2nn", "cnn"], choices=list(PARAMS))
    ap.add_argument("--cohorts", nargs="+", type=int, default=[10, 100, 1000])
    ap.add_argument("--dropouts", nargs="+", type=float, default=[0.0, 0.1, 0.3])
    ap.add_argument("--max-complete", type=int, default=100, help="largest cohort run with the complete graph")
    ap.add_argument("--max-cnn", type=int, default=100, help="largest cohort run with the CNN")
    ap.add_argument("--no-training", action="store_true", help="skip timing the local-training round")
    args = ap.parse_args()
    torch.set_num_threads(1)
    secagg_round(1000, 10, "k", 0.0)  # warm-up: imports, OpenSSL contexts
    skipped, totals = [], {}
    print(f"{'model':5} {'setting':9} {'n':>5} {'drop':>5} {'k':>4} {'client s/cl':>11} {'server s':>9} {'up/cl':>10} {'down/cl':>10}")
    for model in args.models:
        p = PARAMS[model]
        for setting in ("secagg+", "complete", "none"):
            for n in args.cohorts:
                if (setting == "complete" and n > args.max_complete) or (model == "cnn" and n > args.max_cnn):
                    skipped.append(f"{model} {setting} n={n}")
                    continue
                for d in args.dropouts:
                    row = plain_round(p, n, d) if setting == "none" else secagg_round(p, n, "complete" if setting == "complete" else "k", d)
                    if row.get("aborted"):
                        print(f"{model:5} {setting:9} {n:5d} {d:5.0%} {row['k']:4d}  aborted (too few live shareholders)")
                        continue
                    totals[(model, setting, n, d)] = row["total_s"]
                    print(f"{model:5} {setting:9} {n:5d} {d:5.0%} {row['k']:4d} {row['client_s']:11.4f} {row['server_s']:9.3f} "
                          f"{fmt_bytes(row['up']):>10} {fmt_bytes(row['down']):>10}", flush=True)
    print("\ngrowth of the round's total work (all clients + server) per tenfold cohort "
          "(n log n predicts ~15x, n^2 100x):")
    for (model, setting, n, d), t in sorted(totals.items()):
        if setting != "none" and (model, setting, n // 10, d) in totals:
            print(f"  {model} {setting} drop {d:.0%} {n // 10}->{n}: {t / totals[(model, setting, n // 10, d)]:.1f}x")
    if skipped:
        print("skipped (flags --max-complete / --max-cnn): " + ", ".join(skipped))
    if not args.no_training and "2nn" in args.models and 10 in args.cohorts:
        train = local_training_seconds()
        sec = totals.get(("2nn", "secagg+", 10, 0.0))
        print(f"\nbar: 10-client 2NN round: local training {train:.3f} s (sequential engine, best of 3); "
              f"SecAgg+ {sec:.3f} s (all clients + server, drop 0%): {'met' if sec is not None and sec <= train else 'NOT met'}")


if __name__ == "__main__":
    main()
