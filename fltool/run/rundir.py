"""Run directories: runs/<name>/<YYYYmmdd-HHMMSS>/, never overwritten."""

from __future__ import annotations

import fcntl
import itertools
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from fltool.config import Config, dump_config
from fltool.run.atomic import atomic_write_text
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
    except UnicodeEncodeError:
        raise FltoolError(f"{key}: {_shown(run_dir_base(cfg))}: the OS cannot encode this path") from None
    except OSError as exc:  # a file in the way, no permission, a read-only filesystem, ...
        where = f": {exc.filename}" if exc.filename else ""
        raise FltoolError(f"{key}: cannot create the run directory{where}: {exc.strerror or exc}") from None


def check_run_dir_available(cfg: Config) -> None:
    """What `create_run_dir` would refuse, found without creating anything (for
    `launch --dry-run` and before workers start)."""
    key = "output.run_dir" if cfg.output.run_dir else "output.dir"
    base = run_dir_base(cfg)
    if cfg.output.run_dir and base.is_dir() and any(base.iterdir()):
        raise FltoolError(f"output.run_dir: {base} already exists and is not empty; runs are never overwritten")
    existing = next(p for p in (base, *base.parents) if path_exists(p, key) or p == p.parent)
    if not existing.is_dir():
        raise FltoolError(f"{key}: cannot create the run directory: {existing}: Not a directory")  # as the OS says it
    if not os.access(existing, os.W_OK | os.X_OK):
        raise FltoolError(f"{key}: cannot create the run directory: {existing}: Permission denied")


def run_dir_base(cfg: Config) -> Path:
    """output.run_dir itself, or output.dir/name, which holds the timestamped runs."""
    return Path(cfg.output.run_dir) if cfg.output.run_dir else Path(cfg.output.dir) / cfg.name


def missing_dirs(path: Path, key: str = "output.dir") -> list[Path]:
    """`path` and its ancestors that do not exist yet, innermost first."""
    return list(itertools.takewhile(lambda p: not path_exists(p, key), (path, *path.parents)))


def path_exists(path: Path, key: str) -> bool:
    """Path.exists, but a path the OS refuses (a component over 255 bytes, a name the
    filesystem cannot encode) is one line naming `key`, not a traceback."""
    try:
        return path.exists()
    except UnicodeEncodeError:
        raise FltoolError(f"{key}: {_shown(path)}: the OS cannot encode this path") from None
    except OSError as exc:
        raise FltoolError(f"{key}: {_shown(path)}: the OS refuses this path: {exc.strerror}") from None


def _shown(path: Path) -> str:
    text = ascii(str(path))[1:-1]  # (escapes what the terminal could not print either)
    return text if len(text) <= 120 else f"{text[:120]}... ({len(str(path)):,} characters)"


def discard_run_dir(run_dir: Path, created: list[Path]) -> None:
    """Undo `create_run_dir` for a run that never logged a round: remove the run (or,
    where the user's output.run_dir existed empty, only what fltool put in it), then the
    directories it created on the way, while empty (another run may have begun beside it)."""
    if run_dir in created:
        shutil.rmtree(run_dir, ignore_errors=True)
    else:
        for child in run_dir.iterdir():
            shutil.rmtree(child) if child.is_dir() else child.unlink()
    for parent in (p for p in created if p != run_dir):
        try:
            parent.rmdir()
        except OSError:
            break


def _create_run_dir(cfg: Config) -> Path:
    if cfg.output.run_dir:
        check_run_dir_available(cfg)
        run_dir = Path(cfg.output.run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
    else:
        base = run_dir_base(cfg) / time.strftime("%Y%m%d-%H%M%S")
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


LOCK_FILE = ".lock"


@contextmanager
def run_lock(run_dir: Path, what: str = "run") -> Iterator[None]:
    """Hold the run directory for this process: `train`, `train --resume` and `launch`
    (node 0) write a run only while holding it, so two processes never write one run;
    `sweep` holds its sweep directory the same way (`what`: "sweep").
    An flock: the OS drops it when the holder dies, so a killed run leaves no stale lock."""
    path = Path(run_dir) / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise FltoolError(f"{path}: cannot open the run's lock file: {exc.strerror}") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            raise FltoolError(
                f"{run_dir}: another fltool process (pid {holder}) is writing this {what}; wait for it to end, or stop it"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # (closing drops the flock)


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
