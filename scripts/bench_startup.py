"""How long `fltool --help` and `fltool --version` take, process start to exit.

    python scripts/bench_startup.py [--runs 10]

Target: under 0.5 s each (issue 24). For scale, the same process importing torch alone
is timed too: the CLI must not pay for it before a command needs it.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import time

TARGET_S = 0.5


def timed(command: list[str], runs: int) -> list[float]:
    out = []
    for _ in range(runs):
        t0 = time.perf_counter()
        subprocess.run(command, capture_output=True, check=False)
        out.append(time.perf_counter() - t0)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=10)
    args = parser.parse_args()
    fltool = shutil.which("fltool") or f"{sys.executable} -m fltool"
    cases = {
        "fltool --help": [*fltool.split(), "--help"],
        "fltool --version": [*fltool.split(), "--version"],
        "python -c 'import torch'": [sys.executable, "-c", "import torch"],
    }
    for name, command in cases.items():
        times = timed(command, args.runs)
        verdict = "" if name.startswith("python") else ("  ok" if statistics.median(times) < TARGET_S else "  OVER")
        print(f"{name:<26} median {statistics.median(times):.3f} s  min {min(times):.3f} s  max {max(times):.3f} s{verdict}")
    print(f"target: under {TARGET_S} s")


if __name__ == "__main__":
    main()
