"""How long `fltool --help` and `fltool --version` take, process start to exit.

    python scripts/bench_startup.py [--runs 10]
    python scripts/bench_startup.py --train [--baseline-src DIR] [--runs 5]

Target: under 0.5 s each (issue 24). For scale, the same process importing torch alone
is timed too: the CLI must not pay for it before a command needs it.

`--train` adds `fltool train configs/fedavg_mnist.yaml federated.rounds=1` (MNIST from
`$FLTOOL_DATA` through the dataset cache, which the first run builds; that run is not
counted). `--baseline-src DIR` times the same commands with another checkout's `fltool`
package first on PYTHONPATH (e.g. `git worktree add /tmp/before <commit>`), and the
cases run interleaved (one run of each, then the next), so a loaded machine slows both
alike; compare the ratio, not the seconds.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TARGET_S = 0.5
REPO = Path(__file__).resolve().parents[1]
# An editable install's finder answers `import fltool` before sys.path is searched, so
# PYTHONPATH alone would not reach the baseline checkout: drop the finder, then run it.
BASELINE = (
    "import os, runpy, sys; "
    "sys.meta_path[:] = [f for f in sys.meta_path if '__editable__' not in getattr(f, '__module__', '')]; "
    "sys.path.insert(0, os.environ['FLTOOL_BASELINE_SRC']); "
    "runpy.run_module(sys.argv.pop(1), run_name='__main__', alter_sys=True)"
)


def timed_once(command: list[str], env: dict[str, str] | None = None) -> float:
    t0 = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, check=False, env=env)
    elapsed = time.perf_counter() - t0
    if result.returncode != 0:
        sys.exit(f"{' '.join(command)} exited {result.returncode}:\n{result.stderr[-2000:]}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--train", action="store_true", help="also time a 1-round MNIST training run")
    parser.add_argument("--baseline-src", type=Path, help="a checkout whose fltool is timed beside this one")
    args = parser.parse_args()
    fltool = [sys.executable, "-m", "fltool"] if shutil.which("fltool") is None else [shutil.which("fltool")]
    out = tempfile.mkdtemp(prefix="fltool-bench-startup-")
    train_args = ["train", str(REPO / "configs" / "fedavg_mnist.yaml"), "federated.rounds=1", f"output.dir={out}"]
    cases: dict[str, tuple[list[str], dict[str, str] | None]] = {
        "fltool --help": ([*fltool, "--help"], None),
        "fltool --version": ([*fltool, "--version"], None),
        "python -c 'import torch'": ([sys.executable, "-c", "import torch"], None),
    }
    if args.train:
        cases["fltool train (1 round)"] = ([*fltool, *train_args], None)
    if args.baseline_src is not None:
        env = {**os.environ, "FLTOOL_BASELINE_SRC": str(args.baseline_src.resolve())}
        baseline = [sys.executable, "-c", BASELINE, "fltool"]
        probe = BASELINE.replace("runpy.run_module(sys.argv.pop(1), run_name='__main__', alter_sys=True)", "import fltool; print(fltool.__file__)")
        check = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True)
        if not check.stdout.startswith(str(args.baseline_src.resolve())):
            sys.exit(f"--baseline-src: fltool imports from {check.stdout.strip() or check.stderr[-300:]}, not from {args.baseline_src}")
        cases["baseline --help"] = ([*baseline, "--help"], env)
        if args.train:
            cases["baseline train (1 round)"] = ([*baseline, *train_args], env)
    if args.train:
        timed_once([*fltool, *train_args])  # builds the dataset cache if it is not there yet
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(args.runs):
        for name, (command, env) in cases.items():
            times[name].append(timed_once(command, env))
    shutil.rmtree(out, ignore_errors=True)
    for name, ts in times.items():
        verdict = ""
        if name in ("fltool --help", "fltool --version"):
            verdict = "  ok" if statistics.median(ts) < TARGET_S else "  OVER"
        print(f"{name:<26} median {statistics.median(ts):.3f} s  min {min(ts):.3f} s  max {max(ts):.3f} s{verdict}")
    if args.train and args.baseline_src is not None:
        ratios = [a / b for a, b in zip(times["fltool train (1 round)"], times["baseline train (1 round)"])]
        print(f"train: this / baseline, run by run: {', '.join(f'{r:.2f}' for r in ratios)}")
    print(f"target: --help and --version under {TARGET_S} s")


if __name__ == "__main__":
    main()
