"""Signals a command turns into the Ctrl-C path it already handles."""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM (`kill`, a cluster scheduler's preemption or time limit) stops a command
    as Ctrl-C does, through KeyboardInterrupt: a run stops with its last checkpoint
    intact and prints the command that continues it; a sweep asks its runs to stop and
    writes its summary, where a plain SIGTERM ended the sweep alone and left its runs
    (each in a session of its own) training as orphans. It is also the way to stop a
    sweep started in the background of a script, which inherits SIGINT ignored."""
    if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
        yield
        return

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
