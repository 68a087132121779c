"""fltool against Flower 1.42's simulation on the same workload, process start to exit.

    python scripts/bench_vs_flower.py --flower-python /work/flower-venv/bin/python [--runs 3] [--rounds 10]

The workload is `configs/fedavg_mnist.yaml`: FedAvg, 100 IID MNIST clients, C=0.1, E=1,
B=10, lr 0.1, the 2NN, test accuracy after every round. Interleaved, `--runs` times each
(a loaded machine slows all alike; compare the ratios, not the seconds):

- flower: `scripts/flower_fedavg_mnist.py` (run_simulation, a ClientApp and a ServerApp
  with FedAvg, Ray backend) under `--flower-python`;
- vectorized: `fltool train configs/fedavg_mnist.yaml federated.rounds=R federated.engine=vectorized`;
- sequential: the same with `federated.engine=sequential`;
- vectorized-1t, sequential-1t: the same with OMP_NUM_THREADS=1. Ray starts each
  ClientApp actor with OMP_NUM_THREADS set to its CPUs (1 here); on a machine whose
  cores are busy with other work, torch's two threads wait on each other at every
  small op, and a 1-thread run is the steadier measure.

Target (issue 24): vectorized / flower <= 0.2. Flower is not a dependency of fltool;
install it in a venv of its own, outside the repository, torch pinned as fltool's:

    python3.11 -m venv /work/flower-venv
    /work/flower-venv/bin/pip install -c .ci/constraints.txt 'flwr[simulation]==1.42.0' torch

Both read MNIST from fltool's dataset cache (built here first from `$FLTOOL_DATA`).
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FLOWER_APP = REPO / "scripts" / "flower_fedavg_mnist.py"
TARGET = 0.2
CASES = ("flower", "vectorized", "sequential", "vectorized-1t", "sequential-1t")


def run_case(command: list[str], env: dict[str, str]) -> tuple[float, str, int]:
    """(wall seconds, output, exit code); the process and all it started are gone after."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    out, _ = proc.communicate()
    elapsed = time.perf_counter() - t0
    _kill_session(proc.pid)  # Ray can leave a ClientAppActor behind after the driver exits
    return elapsed, out, proc.returncode


def _kill_session(sid: int) -> None:
    ps = subprocess.run(["ps", "-eo", "pid=,sid="], capture_output=True, text=True, check=False).stdout
    for line in ps.splitlines():
        pid, session = (int(v) for v in line.split())
        if session == sid and pid != os.getpid():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def describe(name: str, out: str) -> str:
    """Final accuracy, and for fltool where the time went: its own setup_s (data, model)
    and wall_s (rounds and evaluation); the rest of the process time is Python, imports,
    config checks and exit."""
    if name == "flower":
        found = re.findall(r"round \d+  acc ([0-9.]+)", out)
        return f"final accuracy {found[-1] if found else '-'}"
    fields = dict(re.findall(r"^(final_accuracy|setup_s|wall_s): ([0-9.]+)$", out, flags=re.M))
    return f"final accuracy {fields.get('final_accuracy', '-')}  setup_s {fields.get('setup_s', '-')}  wall_s {fields.get('wall_s', '-')}"


def prepare_cache() -> Path:
    """The cache's MNIST/raw with the four IDX files extracted (fltool builds it)."""
    from fltool.config.schema import DataConfig
    from fltool.data import load_dataset
    from fltool.data.datasets import cache_root

    load_dataset(DataConfig(dataset="mnist"))
    return cache_root(DataConfig()) / "MNIST" / "raw"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--flower-python", required=True, help="python of a venv with flwr[simulation]==1.42.*")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--flower-client-cpus", type=float, default=1.0, help="Ray CPUs per ClientApp")
    parser.add_argument("--cases", nargs="+", default=["flower", "vectorized", "sequential"], choices=list(CASES))
    args = parser.parse_args()

    check = subprocess.run([args.flower_python, "-c", "import flwr, torch; print(flwr.__version__, torch.__version__)"], capture_output=True, text=True)
    if "flower" in args.cases and check.returncode != 0:
        sys.exit(f"--flower-python {args.flower_python}: cannot import flwr ({check.stderr.strip().splitlines()[-1:]}); see --help to install it")
    raw = prepare_cache()
    out_dir = tempfile.mkdtemp(prefix="fltool-vs-flower-")
    env = {**os.environ, "MNIST_RAW": str(raw), "FLOWER_ROUNDS": str(args.rounds), "RAY_DEDUP_LOGS": "0"}
    fltool = [shutil.which("fltool") or sys.executable, *([] if shutil.which("fltool") else ["-m", "fltool"])]
    train = [*fltool, "train", str(REPO / "configs" / "fedavg_mnist.yaml"), f"federated.rounds={args.rounds}", f"output.dir={out_dir}"]
    commands = {
        "flower": [args.flower_python, str(FLOWER_APP), "--client-cpus", str(args.flower_client_cpus)],
        "vectorized": [*train, "federated.engine=vectorized"],
        "sequential": [*train, "federated.engine=sequential"],
    }
    commands["vectorized-1t"], commands["sequential-1t"] = commands["vectorized"], commands["sequential"]
    import torch

    print(f"fltool torch {torch.__version__}; flower venv: {check.stdout.strip() or check.stderr.strip()[-200:]}")
    print(f"python {platform.python_version()}, {os.cpu_count()} CPUs, {args.rounds} rounds, {args.runs} interleaved runs")
    times: dict[str, list[float]] = {name: [] for name in args.cases}
    for run in range(1, args.runs + 1):
        for name in args.cases:
            case_env = {**env, "OMP_NUM_THREADS": "1"} if name.endswith("-1t") else env
            elapsed, out, code = run_case(commands[name], case_env)
            if code != 0:
                print(f"run {run} {name}: exit {code} after {elapsed:.1f} s; last output:\n{out[-3000:]}")
                continue
            times[name].append(elapsed)
            print(f"run {run} {name:<11} {elapsed:7.2f} s  {describe(name, out)}", flush=True)
    shutil.rmtree(out_dir, ignore_errors=True)
    print()
    for name, ts in times.items():
        if ts:
            print(f"{name:<11} median {statistics.median(ts):7.2f} s  min {min(ts):7.2f}  max {max(ts):7.2f}")
    flower = times.get("flower", [])
    for name in CASES[1:]:
        pairs = list(zip(times.get(name, []), flower))
        if pairs:
            ratios = [a / b for a, b in pairs]
            verdict = "ok" if statistics.median(ratios) <= TARGET else "OVER"
            print(f"{name} / flower: run by run {', '.join(f'{r:.3f}' for r in ratios)}; median {statistics.median(ratios):.3f} "
                  f"(target <= {TARGET}) {verdict}")


if __name__ == "__main__":
    main()
