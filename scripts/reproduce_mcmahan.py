"""Reproduce McMahan et al. 2017 (arXiv 1602.05629), rounds to a target accuracy on MNIST.

    python scripts/reproduce_mcmahan.py [--cells 2nn|cnn|all|NAME,...] [--grid 0.05,0.1]
                                        [--seeds 0,1] [--dir runs/mcmahan2017] [--report]
                                        [--set device=cuda ...]

Each cell is a config in configs/paper/mcmahan2017/ (which stops at its target). For every
learning rate of the cell's grid the script runs `fltool sweep CONFIG federated.lr=LR
seed=...` into DIR/<cell>/lr=<LR>: one sweep directory per lr, so that a grid can grow later
and every finished run is reused (a rerun with the same --dir continues, as `fltool sweep`
does). Then it prints, per cell, the paper's rounds (constants from the paper, labelled as
such) beside the rounds measured here at the best lr of the grid, and every lr's result.
`--report` only reads DIR and prints the table. `--set KEY=VALUE` passes a fixed override to
every run (part of each sweep's grid, so a rerun must repeat it).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from fltool.run.runs_table import RunInfo, find_run_dirs, read_rows, run_info

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs" / "paper" / "mcmahan2017"

# The paper's rounds to target, C=0.1 (constants copied from the paper, not measured here):
# 2NN rows from Table 1 (97%; FedSGD is its B=inf row, since E=1), CNN rows from Table 2 (99%).
PAPER_ROUNDS: dict[str, int] = {
    "2nn_fedsgd_iid": 1474,
    "2nn_fedsgd_noniid": 1796,
    "2nn_fedavg_e1_b10_iid": 87,
    "2nn_fedavg_e1_b10_noniid": 664,
    "cnn_fedsgd_iid": 626,
    "cnn_fedsgd_noniid": 483,
    "cnn_fedavg_e5_b10_iid": 20,
    "cnn_fedavg_e5_b10_noniid": 229,
    "cnn_fedavg_e1_b10_iid": 34,
    "cnn_fedavg_e1_b10_noniid": 350,
}

# Default lr grid per cell: factors of 2 around where the cell trains well. FedSGD takes one
# full-batch step per round, so it wants a larger lr than FedAvg's B=10 steps.
GRIDS: dict[str, list[str]] = {
    "2nn_fedsgd_iid": ["0.2", "0.5", "1.0"],
    "2nn_fedsgd_noniid": ["0.2", "0.5", "1.0"],
    "2nn_fedavg_e1_b10_iid": ["0.05", "0.1", "0.2", "0.4"],
    "2nn_fedavg_e1_b10_noniid": ["0.05", "0.1", "0.2"],
    "cnn_fedsgd_iid": ["0.05", "0.1", "0.2", "0.5"],
    "cnn_fedsgd_noniid": ["0.05", "0.1", "0.2", "0.5"],
    "cnn_fedavg_e5_b10_iid": ["0.025", "0.05", "0.1", "0.2"],
    "cnn_fedavg_e5_b10_noniid": ["0.025", "0.05", "0.1", "0.2"],
    "cnn_fedavg_e1_b10_iid": ["0.025", "0.05", "0.1", "0.2"],
    "cnn_fedavg_e1_b10_noniid": ["0.025", "0.05", "0.1", "0.2"],
}


@dataclass
class LrResult:
    lr: str
    runs: list[RunInfo]
    diverged: list[int | None]  # per run: the first round whose test loss was NaN or inf

    @property
    def reached(self) -> list[int]:
        return [r.target_round for r in self.runs if r.target_round is not None]

    @property
    def mean_round(self) -> float | None:
        """Mean rounds to target over the seeds, only when every seed reached it."""
        reached = self.reached
        return statistics.mean(reached) if reached and len(reached) == len(self.runs) else None

    def cell_text(self) -> str:
        """`31`, `31.5 (2 seeds)`, or `>200 (0.9650)`: the target missed in 200 rounds, the best
        accuracy instead; `>=` while a run is unfinished (it may still reach it); `diverged
        (NaN) at round 26 (0.9179)`."""
        if not self.runs:
            return "not run"
        if self.mean_round is not None:
            n = len(self.runs)
            return f"{self.mean_round:g}" + (f" ({n} seeds)" if n > 1 else "")
        missed = [r for r in self.runs if r.target_round is None]  # what they reached instead, in how long
        done = max(r.done for r in missed)
        best = max((r.best_accuracy for r in missed if r.best_accuracy is not None), default=None)
        unfinished = any(r.status != "finished" for r in missed)
        mark = ">=" if unfinished else ">"
        acc = f" ({best:.4f})" if best is not None else ""
        reached = f", {len(self.reached)}/{len(self.runs)} seeds reached" if self.reached else ""
        nan = [d for r, d in zip(self.runs, self.diverged) if r.target_round is None and d is not None]
        if len(nan) == len(missed):  # the rounds it ran say nothing more once the loss is NaN
            return f"diverged (NaN) at round {min(nan)}{acc}{reached}"
        return f"{mark}{done}{acc}{reached}" + (" unfinished" if unfinished else "")


def select_cells(spec: str) -> list[str]:
    """`all`, `2nn`, `cnn`, or comma-separated cell names (or prefixes of them)."""
    names = list(PAPER_ROUNDS)
    if spec == "all":
        return names
    chosen: list[str] = []
    for part in spec.split(","):
        hits = [n for n in names if n == part or n.startswith(part + "_")]
        if not hits:
            raise SystemExit(f"error: --cells: no cell {part!r}; cells: {', '.join(names)}")
        chosen += [h for h in hits if h not in chosen]
    return chosen


def sweep_dir(results: Path, cell: str, lr: str) -> Path:
    return results / cell / f"lr={lr}"


def run_cell(cell: str, grid: list[str], seeds: str, results: Path, jobs: int, extra: list[str]) -> None:
    """One `fltool sweep` per lr; a rerun continues it (finished runs are skipped)."""
    for lr in grid:
        cmd = [
            sys.executable, "-m", "fltool", "sweep", str(CONFIGS / f"{cell}.yaml"),
            *extra, f"federated.lr={lr}", f"seed={seeds}", "--jobs", str(jobs), "--dir", str(sweep_dir(results, cell, lr)),
        ]  # fmt: skip
        print(f"== {cell} lr={lr}: {' '.join(cmd[1:])}", flush=True)
        code = subprocess.call(cmd)
        if code not in (0, 1):  # 1: a run stopped short, which the table shows; else give up
            raise SystemExit(code)


def read_cell(results: Path, cell: str) -> list[LrResult]:
    """Every lr run so far for the cell (not only this invocation's grid), by lr."""
    out = []
    base = results / cell
    dirs = sorted(base.glob("lr=*"), key=lambda p: float(p.name[3:])) if base.is_dir() else []
    for d in dirs:
        found, _skipped = find_run_dirs(d)
        out.append(LrResult(d.name[3:], [run_info(p) for p in found], [first_nan(p) for p in found]))
    return out


def first_nan(run_dir: Path) -> int | None:
    """The first evaluated round whose test loss is not finite: the run diverged there.
    (metrics.jsonl writes NaN as null, so an evaluated row with a null loss is one.)"""
    for row in read_rows(run_dir):
        if row.get("test_accuracy") is not None and row.get("test_loss") is None:
            return row.get("round")
    return None


def best_of(results: list[LrResult]) -> LrResult | None:
    done = [r for r in results if r.mean_round is not None]
    return min(done, key=lambda r: (r.mean_round, float(r.lr))) if done else None


def table(results: Path, cells: list[str]) -> str:
    header = ["cell", "paper rounds", "our rounds (best lr)", "ours/paper", "best lr", "grid: lr -> rounds (best acc if not reached)"]
    rows = []
    for cell in cells:
        by_lr = read_cell(results, cell)
        best = best_of(by_lr)
        ours = best.cell_text() if best else "-"
        ratio = f"{best.mean_round / PAPER_ROUNDS[cell]:.2f}" if best else "-"
        grid = "; ".join(f"{r.lr}: {r.cell_text()}" for r in by_lr) or "not run"
        rows.append([cell, str(PAPER_ROUNDS[cell]), ours, ratio, best.lr if best else "-", grid])
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header, *rows]]
    lines.append("paper rounds: McMahan et al. 2017, C=0.1 (2NN: Table 1, 97%; CNN: Table 2, 99%), copied, not measured")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cells", default="all", help="all, 2nn, cnn, or cell names/prefixes, comma-separated")
    parser.add_argument("--grid", help="lr values, comma-separated, for every chosen cell (default: each cell's own grid)")
    parser.add_argument("--seeds", default="0", help="seeds, as fltool sweep takes them: 0,1 or 'range(3)'")
    parser.add_argument("--dir", type=Path, default=Path("runs/mcmahan2017"), help="results directory (reused by a rerun)")
    parser.add_argument("--jobs", type=int, default=1, help="runs at once within one lr's sweep")
    parser.add_argument("--report", action="store_true", help="only print the table from --dir")
    parser.add_argument("--set", dest="extra", action="append", default=[], metavar="KEY=VALUE", help="a fixed override for every run")
    args = parser.parse_args(argv)
    cells = select_cells(args.cells)
    if not args.report:
        for cell in cells:
            grid = args.grid.split(",") if args.grid else GRIDS[cell]
            run_cell(cell, grid, args.seeds, args.dir, args.jobs, args.extra)
    print(table(args.dir, cells))
    return 0


if __name__ == "__main__":
    sys.exit(main())
