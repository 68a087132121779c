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
