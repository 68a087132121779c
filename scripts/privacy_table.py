"""The privacy/utility table of docs/privacy.md, on real MNIST.

    python scripts/privacy_table.py --json docs/privacy.json

`configs/dp_fedavg_mnist.yaml`'s setting: K = 1,000 IID clients of 60 examples, 2NN,
Poisson sampling at q = 0.1, E = 1, B = 10, lr 0.1, the vectorized engine, R = 100
rounds, delta = 1/K^1.1. Rows: central DP-FedAvg (clip S = 1, noise calibrated to
epsilon 1, 2, 4, 8 over the R rounds, RDP accountant), clipping without noise (epsilon
infinite), plain FedAvg (no clipping, weighted by n_k); then plain FedAvg's uploads
compressed: QSGD at 8 and 2 bits, top-1% with error feedback. Each row: final test
accuracy, epsilon spent, noise multiplier, and the uploaded bytes over the run against
the uncompressed float32 uploads.

Rerun with the same --json: the rows it already has are kept.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

from fltool.config import load_config
from fltool.run.runner import start_run
from fltool.ui import PlainReporter

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "dp_fedavg_mnist.yaml"
COMMON = ["federated.rounds=100", "eval.every=100", "output.checkpoint_every=1000000", "dp.max_epsilon=null"]
NO_DP = ["dp.mode=none", "dp.target_epsilon=null"]
ROWS = {
    **{f"DP-FedAvg, epsilon {eps}": [f"dp.target_epsilon={eps}"] for eps in (1, 2, 4, 8)},
    "clipping only (z = 0, epsilon inf)": ["dp.target_epsilon=null", "dp.noise_multiplier=0"],
    "FedAvg (no DP)": NO_DP,
    "FedAvg + QSGD 8 bits": [*NO_DP, "compression.name=qsgd", "compression.bits=8"],
    "FedAvg + QSGD 2 bits": [*NO_DP, "compression.name=qsgd", "compression.bits=2"],
    "FedAvg + top-1% with error feedback": [*NO_DP, "compression.name=topk", "compression.fraction=0.01", "compression.error_feedback=true"],
}


class Quiet(PlainReporter):
    def start(self, name: str, run_dir: str, first: int, total: int) -> None:
        pass

    def update(self, row: dict[str, Any]) -> None:
        pass

    def message(self, text: str) -> None:
        print(f"  {text}", flush=True)

    def finish(self, summary: dict[str, Any]) -> None:
        pass


def run_row(overrides: list[str], out: Path) -> dict[str, Any]:
    cfg = load_config(CONFIG, [*COMMON, f"output.dir={out}", *overrides])
    rows = start_run(cfg, Quiet()).metrics
    model_bytes = rows[0]["bytes_down"] / rows[0]["clients"]  # float32 model, per client
    uploads = sum(r["clients"] for r in rows)  # every sampled client returns
    return {
        "test_accuracy": rows[-1]["test_accuracy"],
        "epsilon": rows[-1].get("epsilon"),
        "noise_multiplier": rows[-1].get("dp_noise_multiplier"),
        "bytes_up": sum(r["bytes_up"] for r in rows),
        "uncompressed_bytes": uploads * model_bytes,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, default=None, help="write the rows here (and keep those it has)")
    args = parser.parse_args()
    results = json.loads(args.json.read_text()) if args.json and args.json.exists() else {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, overrides in ROWS.items():
            if name in results:
                continue
            results[name] = run_row(overrides, Path(tmp))
            print(f"{name}: {results[name]}", flush=True)
            if args.json:
                args.json.write_text(json.dumps(results, indent=1))
    print("\n| run | test accuracy | epsilon | noise multiplier | bytes up | x uncompressed |\n| --- | --- | --- | --- | --- | --- |")
    for name, r in results.items():
        eps = "-" if r["epsilon"] is None else ("inf" if r["epsilon"] == float("inf") else f"{r['epsilon']:.3f}")
        z = "-" if r["noise_multiplier"] is None else f"{r['noise_multiplier']:.4f}"
        print(f"| {name} | {r['test_accuracy']:.4f} | {eps} | {z} | {r['bytes_up'] / 1e6:,.1f} MB | {r['bytes_up'] / r['uncompressed_bytes']:.4f} |")


if __name__ == "__main__":
    main()
