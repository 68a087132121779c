"""Rounds to a target accuracy for every algorithm and server optimizer on real MNIST.

The workload is McMahan et al.'s pathological non-IID split: 100 clients of 2 label
shards each, the 2NN, C=0.1, E=1, B=10. Each entry runs `fltool train` in-process
with the vectorized engine, evaluating every round, until it reaches --target or
--rounds. `--tune ROUNDS` first tries each entry's grid for ROUNDS rounds and keeps the
setting with the best final accuracy; without it, each entry runs its grid's first
setting. Prints a markdown table (and writes JSON with
--json) for docs/algorithms.md.

    python scripts/compare_algorithms.py --tune 60 --rounds 500 --json docs/compare.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

from fltool.config import load_config
from fltool.run.runner import start_run
from fltool.ui import PlainReporter

# McMahan et al.'s pathological non-IID MNIST workload (their Table 1/2 setting)
BASE = [
    "name=compare",
    "seed=0",
    "data.dataset=mnist",
    "data.partition=shards",
    "data.shards_per_client=2",
    "model.name=mlp",
    "federated.num_clients=100",
    "federated.fraction=0.1",
    "federated.local_epochs=1",
    "federated.batch_size=10",
]

# name -> (fixed overrides, grid of alternatives to tune over)
ENTRIES: dict[str, tuple[list[str], list[list[str]]]] = {
    "FedAvg": (["algorithm.name=fedavg"], [["federated.lr=0.05"], ["federated.lr=0.1"]]),
    "FedProx": (
        ["algorithm.name=fedprox"],
        [["federated.lr=0.05", "algorithm.mu=0.01"], ["federated.lr=0.1", "algorithm.mu=0.01"], ["federated.lr=0.1", "algorithm.mu=0.1"]],
    ),
    "FedAvgM": (
        ["server_optimizer.name=sgd", "server_optimizer.momentum=0.9"],
        [["federated.lr=0.05", "server_optimizer.lr=0.3"], ["federated.lr=0.05", "server_optimizer.lr=1.0"], ["federated.lr=0.1", "server_optimizer.lr=0.3"]],
    ),
    "FedAdam": (
        ["server_optimizer.name=adam"],
        [[f"federated.lr=0.05", f"server_optimizer.lr={lr}"] for lr in (0.01, 0.003, 0.03)],
    ),
    "FedYogi": (
        ["server_optimizer.name=yogi"],
        [[f"federated.lr=0.05", f"server_optimizer.lr={lr}"] for lr in (0.01, 0.003, 0.03)],
    ),
    "FedAdagrad": (
        ["server_optimizer.name=adagrad"],
        [[f"federated.lr=0.05", f"server_optimizer.lr={lr}"] for lr in (0.03, 0.01, 0.1)],
    ),
    "SCAFFOLD": (["algorithm.name=scaffold"], [["federated.lr=0.05"], ["federated.lr=0.1"]]),
    "FedNova": (["algorithm.name=fednova"], [["federated.lr=0.1"], ["federated.lr=0.05"]]),
}


def run(overrides: list[str], rounds: int, target: float | None, out: Path) -> dict[str, Any]:
    common = [
        "federated.engine=vectorized",
        f"federated.rounds={rounds}",
        "eval.every=1",
        f"eval.target_accuracy={'null' if target is None else target}",
        "output.checkpoint_every=1000000",
        f"output.dir={out}",
    ]
    cfg = load_config(None, [*BASE, *common, *overrides])
    t0 = time.perf_counter()
    summary = start_run(cfg, QuietReporter())
    accs = [r["test_accuracy"] for r in summary.metrics]
    return {
        "overrides": overrides,
        "rounds_run": summary.rounds_completed,
        "target_round": summary.target_round,
        "final_accuracy": accs[-1],
        "best_accuracy": max(accs),
        "wall_s": round(time.perf_counter() - t0, 1),
    }


class QuietReporter(PlainReporter):
    def start(self, name: str, run_dir: str, first: int, total: int) -> None:
        self.total = total

    def update(self, row: dict[str, Any]) -> None:
        if row["round"] % 50 == 0:
            print(f"    round {row['round']}: acc {row['test_accuracy']:.4f}", flush=True)

    def finish(self, summary: dict[str, Any]) -> None:
        pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=500, help="cap on rounds (default 500)")
    parser.add_argument("--target", type=float, default=0.97)
    parser.add_argument("--tune", type=int, default=0, metavar="ROUNDS", help="tune each grid for ROUNDS rounds first")
    parser.add_argument("--only", nargs="*", default=None, help="entries to run (default all)")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    args = parser.parse_args()
    names = args.only or list(ENTRIES)
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            fixed, grid = ENTRIES[name]
            choice, tuning = grid[0], []
            if args.tune and len(grid) > 1:
                for alt in grid:
                    print(f"{name}: tuning {' '.join(alt)}", flush=True)
                    tuning.append(run([*fixed, *alt], args.tune, None, Path(tmp)))
                choice = max(tuning, key=lambda t: t["final_accuracy"])["overrides"][len(fixed) :]
            print(f"{name}: {' '.join(choice)}", flush=True)
            results[name] = {**run([*fixed, *choice], args.rounds, args.target, Path(tmp)), "tuning": tuning}
            if args.json:
                args.json.write_text(json.dumps(results, indent=1))
    print(f"\n| algorithm | settings | rounds to {args.target:.0%} | accuracy at the end | wall s |")
    print("| --- | --- | --- | --- | --- |")
    for name, r in results.items():
        reached = r["target_round"] if r["target_round"] is not None else f"not in {r['rounds_run']}"
        print(f"| {name} | {' '.join(r['overrides'])} | {reached} | {r['final_accuracy']:.4f} | {r['wall_s']} |")


if __name__ == "__main__":
    main()
