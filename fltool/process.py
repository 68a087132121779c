"""A command's process: its start (the garbage collector paused while torch is
imported) and its end (without the interpreter's teardown).

Importing torch builds some 200k objects that live as long as the process; the
collections they trigger on the way find no garbage and are a noticeable share of a
short CPU run's start. So an entry point pauses the collector (`pause_gc`) before its
imports, and once they are done (`resume_gc`) freezes what they made out of its reach
(later collections stay cheap too) and lets it run again.

After `import torch`, the interpreter's normal exit runs libtorch's C++ static
destructors: every operator is deregistered from the dispatcher one by one (each
recomputing dispatch tables), and the CUDA libraries loaded with torch, GPU or not,
unregister their kernels. That is work for a process that is going away anyway. So the
entry points finish what Python's exit would (the `atexit` handlers, flushing stdout
and stderr), then end the process with `os._exit` (`exit_quickly`). Our files are all
written and closed by then: every write goes through a `with` block and an atomic
rename (`fltool.run.atomic`).
"""

from __future__ import annotations

import atexit
import gc
import os
import sys
import threading
from typing import NoReturn


def pause_gc() -> None:
    gc.disable()


def resume_gc() -> None:
    """After the imports: freeze what they made, and collect again (once; a no-op when
    the collector runs already)."""
    if not gc.isenabled():
        gc.freeze()
        gc.enable()


def exit_code(status: object) -> int:
    """The exit status `sys.exit(status)` would give: None is 0, an int is itself, any
    other object is printed to stderr and gives 1."""
    if status is None:
        return 0
    if isinstance(status, int):
        return status
    print(status, file=sys.stderr)
    return 1


def exit_quickly(status: object = 0) -> NoReturn:
    """`sys.exit(status)`, less the interpreter's own teardown.

    The normal exit is taken instead where something would be lost: a non-daemon thread
    still running (`os._exit` would kill it), or a profiler or tracer watching the
    process (`python -m cProfile -o FILE -m fltool ...` writes FILE after the command
    returns, not in an `atexit` handler)."""
    code = exit_code(status)
    others = [t for t in threading.enumerate() if t is not threading.main_thread() and not t.daemon]
    if others or sys.getprofile() is not None or sys.gettrace() is not None:
        gc.freeze()  # the normal exit's last collections would walk all of torch's objects
        sys.exit(code)
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a reader that went away, a closed stream
            pass
    os._exit(code)
