"""`exit_quickly` ends the process as `sys.exit` would, as far as anyone can see: the
exit code, every `atexit` handler, output buffered in stdout and stderr, and a
non-daemon thread's work; only libtorch's C++ teardown is skipped."""

from __future__ import annotations

import subprocess
import sys

import pytest

from fltool.process import exit_code


def run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize(("status", "code"), [(None, 0), (0, 0), (3, 3), ("boom", 1)])
def test_the_exit_code_is_the_one_sys_exit_gives(status, code):
    assert exit_code(status) == code
    done = run(f"import torch; from fltool.process import exit_quickly; exit_quickly({status!r})")
    plain = run(f"import sys; sys.exit({status!r})")
    assert (done.returncode, done.stderr) == (plain.returncode, plain.stderr) == (code, "boom\n" if code == 1 else "")


def test_atexit_handlers_run_and_buffered_output_arrives():
    code = (
        "import atexit, sys, torch\n"
        "from fltool.process import exit_quickly\n"
        "atexit.register(lambda: print('handler ran'))\n"
        "sys.stdout.write('x' * 100_000)\n"  # more than a pipe holds, still buffered in part
        "sys.stderr.write('to stderr')\n"
        "exit_quickly(5)\n"
    )
    done = run(code)
    assert done.returncode == 5
    assert done.stdout == "x" * 100_000 + "handler ran\n" and done.stderr == "to stderr"


def test_a_running_non_daemon_thread_finishes_first():
    code = (
        "import threading, time\n"
        "from fltool.process import exit_quickly\n"
        "def work():\n    time.sleep(0.5); print('thread done', flush=True)\n"
        "threading.Thread(target=work).start()\n"
        "exit_quickly(0)\n"
    )
    done = run(code)
    assert (done.returncode, done.stdout) == (0, "thread done\n")


def test_the_console_entry_keeps_the_commands_exit_codes_and_output(tmp_path):
    entry = "import sys; sys.argv[0] = 'fltool'; from fltool.cli import entry; entry()"
    version = subprocess.run([sys.executable, "-c", entry, "--version"], capture_output=True, text=True, timeout=120)
    assert version.returncode == 0 and version.stdout.startswith("fltool ")
    missing = subprocess.run([sys.executable, "-c", entry, "eval", str(tmp_path / "none.pt")], capture_output=True, text=True, timeout=120)
    assert missing.returncode == 2 and missing.stderr.startswith("error: ") and len(missing.stderr.splitlines()) == 1
    usage = subprocess.run([sys.executable, "-m", "fltool", "train", "--bogus"], capture_output=True, text=True, timeout=120)
    assert usage.returncode == 2 and "No such option: --bogus" in usage.stderr


def test_a_profiler_still_writes_its_file(tmp_path):
    """`python -m cProfile -o FILE -m fltool ...` writes FILE once the module returns."""
    out = tmp_path / "fltool.prof"
    done = subprocess.run([sys.executable, "-m", "cProfile", "-o", str(out), "-m", "fltool", "--version"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.startswith("fltool ")
    assert out.stat().st_size > 0
