"""The CLI starts without torch: `--help` and `--version` import neither torch nor
torchvision (each costs seconds); the commands import them when they run. The time
itself is measured in scripts/bench_startup.py, not here."""

from __future__ import annotations

import subprocess
import sys

from typer.testing import CliRunner

from fltool import __version__
from fltool.cli import app


def test_version():
    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output == f"fltool {__version__}\n"


def test_the_cli_module_imports_no_torch():
    code = "import sys, fltool.cli; heavy = sorted(m for m in ('torch', 'torchvision', 'numpy', 'scipy') if m in sys.modules); print(heavy)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def test_the_collector_pauses_for_the_imports_and_resumes_for_the_command():
    """Importing torch builds objects that live as long as the process; collecting while
    they are built finds nothing. `main` pauses the collector until the command's
    imports are done, then freezes what they made and resumes it; a caller in the same
    process gets it back enabled."""
    code = (
        "import gc, sys, fltool.cli\n"
        "log = []\n"
        "gc.callbacks.append(lambda phase, info: phase == 'start' and log.append('collect'))\n"
        "resume = fltool.cli.resume_gc\n"
        "def spy():\n"
        "    log.append('torch' if 'torch' in sys.modules else 'no torch')\n"
        "    resume()\n"
        "    log.append('enabled' if gc.isenabled() else 'disabled')\n"
        "fltool.cli.resume_gc = spy\n"
        "try:\n    fltool.cli.main(['eval', 'no-such-checkpoint.pt'])\n"
        "except SystemExit as e:\n    log.append(f'exit {e.code}')\n"
        "print(log[:2], log[-1], gc.isenabled(), gc.get_freeze_count(), sep='|')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    first_two, last, enabled_after, frozen = done.stdout.strip().split("|")
    # no collection before the command's imports were done, which include torch
    assert (first_two, last, enabled_after) == ("['torch', 'enabled']", "exit 2", "True")
    assert int(frozen) > 100_000  # torch's objects, out of the collector's reach
