"""A testing hook that kills or breaks one worker, to exercise torchrun's restarts.

Not for production use. Set in the environment of `fltool launch`:
  FLTOOL_FAULT_AT_EPOCH=N   at the start of DDP epoch N ...
  FLTOOL_FAULT_RANK=R       ... global rank R (default 1) ...
  FLTOOL_FAULT_KIND=exit    ... dies with os._exit(1) (default), `raise` raises RuntimeError,
                            or `hang` sleeps 600 s, like a wedged process (its peers then
                            fail at their next collective after ddp.timeout_s).
  FLTOOL_FAULT_STALL_S=S    the other ranks sleep S s at that epoch, like a node busy in a
                            long step: its agent then restarts for the membership change
                            (no failure, so its restart count stays 0), not for a failure.
Each fires once per run directory: marker files `<run>/.fault_injected` and
`<run>/.fault_stalled` record that it happened, so the restarted worker group trains on.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

MARKER = ".fault_injected"
STALL_MARKER = ".fault_stalled"


def maybe_inject_fault(run_dir: Path, epoch: int, rank: int) -> None:
    at = os.environ.get("FLTOOL_FAULT_AT_EPOCH")
    if not at or int(at) != epoch:
        return
    if rank != int(os.environ.get("FLTOOL_FAULT_RANK", "1")):
        stall = os.environ.get("FLTOOL_FAULT_STALL_S")
        if stall and not (run_dir / STALL_MARKER).exists():
            (run_dir / STALL_MARKER).write_text(f"stall at epoch {epoch} on rank {rank}\n")
            time.sleep(float(stall))
        return
    marker = run_dir / MARKER
    if marker.exists():
        return
    kind = os.environ.get("FLTOOL_FAULT_KIND", "exit")
    marker.write_text(f"{kind} at epoch {epoch} on rank {rank}\n")
    if kind == "raise":
        raise RuntimeError(f"injected fault at epoch {epoch} on rank {rank} (FLTOOL_FAULT_AT_EPOCH)")
    if kind == "hang":
        time.sleep(600)
        return
    os._exit(1)  # no cleanup, no exception: like a killed process
