"""The robustness and straggler tables of docs/robustness.md, on real MNIST.

    python scripts/fault_tables.py robust --json docs/robust.json       # aggregators x attacks x splits
    python scripts/fault_tables.py stragglers --csv docs/stragglers.csv  # Li et al. 2020, Figure 1's shape

`robust`: FedAvg's clients (2NN, C=0.1, E=1, B=10, lr 0.1, 50 rounds) on the IID and
the pathological non-IID (2 shards per client) split, for each aggregator under a clean
run, 10% and 30% sign flipping (k = 10), 10% Gaussian noise (std 1) and 10% ALIE
(z = 1, since the paper's z_max is 0 for a cohort of 10 with 1 attacker); attackers
are a fixed set of the 100 clients. Prints the final test accuracy of each cell.

`stragglers`: pathological non-IID, 2NN, C=0.1, E=5, B=10, lr 0.05, 50 rounds, for 0%,
50% and 90% stragglers (each does a uniform 1..5 of its 5 epochs): FedAvg (stragglers
dropped), FedProx mu = 0 (partial work kept) and FedProx mu = 1. Writes test accuracy
every 5 rounds.

Rerun with the same --json or --csv, a table keeps the runs the file already has.
"""

from __future__ import annotations

import argparse
import csv
import json
import tempfile
from pathlib import Path
from typing import Any

from fltool.config import load_config
from fltool.run.runner import start_run
from fltool.ui import PlainReporter

SPLITS = {"iid": ["data.partition=iid"], "non-iid": ["data.partition=shards", "data.shards_per_client=2"]}
COMMON = [
    "name=faults",
    "seed=0",
    "data.dataset=mnist",
    "model.name=mlp",
    "federated.num_clients=100",
    "federated.fraction=0.1",
    "federated.batch_size=10",
    "federated.engine=vectorized",
    "federated.rounds=50",
    "output.checkpoint_every=1000000",
]
AGGREGATORS = {
    "mean (FedAvg)": ["aggregator.name=mean"],
    "median": ["aggregator.name=median"],
    "trimmed mean (beta 0.3)": ["aggregator.name=trimmed_mean", "aggregator.beta=0.3"],
    "Krum (f 3)": ["aggregator.name=krum", "aggregator.f=3"],
    "Multi-Krum (f 3, m 7)": ["aggregator.name=multikrum", "aggregator.f=3"],
}
ATTACKS = {
    "clean": [],
    "sign flip 10%": ["attack.name=sign_flip", "attack.fraction=0.1", "attack.k=10"],
    "sign flip 30%": ["attack.name=sign_flip", "attack.fraction=0.3", "attack.k=10"],
    "Gaussian 10%": ["attack.name=gaussian", "attack.fraction=0.1", "attack.std=1.0"],
    "ALIE 10%": ["attack.name=alie", "attack.fraction=0.1", "attack.z=1.0"],
}
STRAGGLERS = [0.0, 0.5, 0.9]
STRAGGLER_METHODS = {
    "FedAvg (drop)": ["algorithm.name=fedavg", "clients.straggler_policy=drop"],
    "FedProx mu=0 (partial)": ["algorithm.name=fedprox", "algorithm.mu=0.0", "clients.straggler_policy=partial"],
    "FedProx mu=1 (partial)": ["algorithm.name=fedprox", "algorithm.mu=1.0", "clients.straggler_policy=partial"],
}


class Quiet(PlainReporter):
    def start(self, name: str, run_dir: str, first: int, total: int) -> None:
        pass

    def update(self, row: dict[str, Any]) -> None:
        pass

    def finish(self, summary: dict[str, Any]) -> None:
        pass


def run(overrides: list[str], out: Path) -> list[dict[str, Any]]:
    cfg = load_config(None, [*COMMON, f"output.dir={out}", *overrides])
    return start_run(cfg, Quiet()).metrics


def robust(args: argparse.Namespace, out: Path) -> None:
    # rerun with the same --json: the cells it already has are kept
    results: dict[str, dict[str, dict[str, float]]] = json.loads(args.json.read_text()) if args.json and args.json.exists() else {}
    for split, split_keys in SPLITS.items():
        for agg, agg_keys in AGGREGATORS.items():
            for attack, attack_keys in ATTACKS.items():
                if attack in results.get(split, {}).get(agg, {}):
                    continue
                rows = run([*split_keys, "federated.lr=0.1", "eval.every=50", *agg_keys, *attack_keys], out)
                acc = rows[-1]["test_accuracy"]
                results.setdefault(split, {}).setdefault(agg, {})[attack] = acc
                print(f"{split} | {agg} | {attack}: {acc}", flush=True)
                if args.json:
                    args.json.write_text(json.dumps(results, indent=1))
    for split, table in results.items():
        print(f"\n{split}\n\n| aggregator | {' | '.join(ATTACKS)} |\n| --- |{' --- |' * len(ATTACKS)}")
        for agg, cells in table.items():
            print(f"| {agg} | " + " | ".join("NaN" if v is None else f"{v:.4f}" for v in cells.values()) + " |")


def stragglers(args: argparse.Namespace, out: Path) -> None:
    series = read_curves(args.csv) if args.csv and args.csv.exists() else {}  # rerun: keep finished runs
    for share in STRAGGLERS:
        for method, keys in STRAGGLER_METHODS.items():
            name = f"{share:.0%} stragglers | {method}"
            if name in series:
                continue
            if share == 0 and "mu=0" in method:
                # without stragglers, FedProx at mu = 0 is FedAvg step for step: the same run
                series[name] = series[f"{share:.0%} stragglers | FedAvg (drop)"]
            else:
                overrides = [*SPLITS["non-iid"], "federated.lr=0.05", "federated.local_epochs=5", "eval.every=5"]
                rows = run([*overrides, f"clients.stragglers={share}", "clients.straggler_work=epochs", *keys], out)
                series[name] = [{"round": r["round"], "test_accuracy": r["test_accuracy"]} for r in rows if r["test_accuracy"] is not None]
            print(f"{name}: " + " ".join(f"{p['test_accuracy']:.4f}" for p in series[name]), flush=True)
            if args.csv:
                with args.csv.open("w", newline="") as f:
                    w = csv.writer(f)
                    w.writerow(["stragglers_and_method", "round", "test_accuracy"])
                    for key, points in series.items():
                        w.writerows([key, p["round"], p["test_accuracy"]] for p in points)


def read_curves(path: Path) -> dict[str, list[dict[str, Any]]]:
    series: dict[str, list[dict[str, Any]]] = {}
    with path.open() as f:
        for row in csv.DictReader(f):
            series.setdefault(row["stragglers_and_method"], []).append({"round": int(row["round"]), "test_accuracy": float(row["test_accuracy"])})
    return series


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("table", choices=["robust", "stragglers"])
    parser.add_argument("--json", type=Path, default=None, help="robust: write the results here")
    parser.add_argument("--csv", type=Path, default=None, help="stragglers: write the accuracy curves here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        (robust if args.table == "robust" else stragglers)(args, Path(tmp))


if __name__ == "__main__":
    main()
