"""Shell completion: on (--show-completion prints a script), and config keys complete
after the YAML file, from the schema and the file, without importing torch."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

from fltool.completion import complete_keys

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_keys_from_the_schema_and_the_file():
    assert complete_keys("federated.l", None) == ["federated.local_epochs=", "federated.lr="]
    assert "algorithm.mu=" in complete_keys("algorithm.", str(CONFIGS / "fedprox_mnist.yaml"))
    assert complete_keys("seed=", None) == [] and complete_keys("nope", "/no/such.yaml") == []


def test_the_shell_asks_and_gets_keys_without_torch(tmp_path):
    script = (
        "import sys, fltool.cli\n"
        "try:\n    fltool.cli.main()\nexcept SystemExit:\n    pass\n"
        "print('heavy', sorted(m for m in ('torch', 'numpy') if m in sys.modules))\n"
    )
    words = f"fltool sweep {CONFIGS / 'fedprox_mnist.yaml'} algorithm."
    env = {**os.environ, "_FLTOOL_COMPLETE": "complete_bash", "COMP_WORDS": words, "COMP_CWORD": "3"}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60)
    lines = done.stdout.splitlines()
    assert "algorithm.mu=" in lines and "algorithm.name=" in lines and lines[-1] == "heavy []"


def test_show_completion_prints_a_script():
    # Typer's --show-completion takes no value: it detects the shell from the parent
    # process, so the command runs under bash whatever started pytest
    command = f"{shlex.quote(sys.executable)} -m fltool --show-completion"
    done = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "_fltool_completion" in done.stdout
