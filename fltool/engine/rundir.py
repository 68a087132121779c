"""Run directories: runs/<name>/<YYYYmmdd-HHMMSS>/, never overwritten."""

from __future__ import annotations

import time
from pathlib import Path

from fltool.config import Config, dump_config
from fltool.engine.atomic import atomic_write_text
from fltool.errors import FltoolError

CONFIG_FILE = "config.yaml"
CHECKPOINT_DIR = "checkpoints"
LAST = "last.pt"
BEST = "best.pt"


def create_run_dir(cfg: Config) -> Path:
    """Make a fresh run directory and write the resolved config into it."""
    key = "output.run_dir" if cfg.output.run_dir else "output.dir"
    try:
        return _create_run_dir(cfg)
    except OSError as exc:  # a file in the way, no permission, a read-only filesystem, ...
        where = f": {exc.filename}" if exc.filename else ""
        raise FltoolError(f"{key}: cannot create the run directory{where}: {exc.strerror or exc}") from None


def _create_run_dir(cfg: Config) -> Path:
    if cfg.output.run_dir:
        run_dir = Path(cfg.output.run_dir)
        if run_dir.is_dir() and any(run_dir.iterdir()):
            raise FltoolError(f"output.run_dir: {run_dir} already exists and is not empty; runs are never overwritten")
        run_dir.mkdir(parents=True, exist_ok=True)
    else:
        base = Path(cfg.output.dir) / cfg.name / time.strftime("%Y%m%d-%H%M%S")
        run_dir = base
        for i in range(1, 1000):
            try:
                run_dir.mkdir(parents=True, exist_ok=False)
                break
            except FileExistsError:
                run_dir = base.with_name(f"{base.name}-{i}")
    (run_dir / CHECKPOINT_DIR).mkdir(exist_ok=True)
    atomic_write_text(run_dir / CONFIG_FILE, dump_config(cfg))
    return run_dir


def last_checkpoint(run_dir: Path) -> Path:
    return run_dir / CHECKPOINT_DIR / LAST


def best_checkpoint(run_dir: Path) -> Path:
    return run_dir / CHECKPOINT_DIR / BEST


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C (or SIGTERM to `launch`) stopped the run in `run_dir`. The CLI exits 130
    with one line on how to continue it."""

    def __init__(self, run_dir: Path) -> None:
        super().__init__(str(run_dir))
        self.run_dir = run_dir

    @property
    def resumable(self) -> bool:
        # checkpoints are written atomically, so one that exists is whole
        return last_checkpoint(self.run_dir).is_file()
