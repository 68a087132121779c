"""User-facing errors: the CLI prints their lines and exits 2, without a traceback.
An interrupted run exits 130 with one line on how to continue it."""

from __future__ import annotations

from pathlib import Path


class FltoolError(Exception):
    """An error caused by the user's input (config, files, flags)."""

    def __init__(self, *lines: str) -> None:
        super().__init__("\n".join(lines))
        self.lines = list(lines)


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C (or SIGTERM to `launch`) stopped the run in `run_dir`; `resumable` says
    whether it had written a checkpoint (written atomically, so one that exists is whole)."""

    def __init__(self, run_dir: Path, resumable: bool) -> None:
        super().__init__(str(run_dir))
        self.run_dir = run_dir
        self.resumable = resumable
