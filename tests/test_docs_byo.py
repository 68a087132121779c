"""docs/byo.md runs as printed: its mine.py and byo.yaml,
written out as a user would, train through the `fltool` console script with
PYTHONPATH=., on a natural partition whose client count comes from the data."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import torch
import yaml

from fltool.run.metrics import read_metrics

REPO = Path(__file__).resolve().parents[1]
HEADING = "## Bring your own model and data"  # README's short version points to docs/byo.md
FLTOOL = Path(sys.executable).with_name("fltool")


def readme_section() -> str:
    text = (REPO / "README.md").read_text()
    assert text.count(HEADING + "\n") == 1, f"README.md needs exactly one '{HEADING}' section"
    return re.split(r"^## ", text.split(HEADING + "\n", 1)[1], maxsplit=1, flags=re.M)[0]


def blocks(lang: str, text: str | None = None) -> list[str]:
    text = (REPO / "docs" / "byo.md").read_text() if text is None else text
    return re.findall(rf"^```{lang}\n(.*?)^```$", text, flags=re.M | re.S)


def test_the_readme_sketch_is_the_docs_example():
    """Every key the README's short YAML shows has the value the tested example uses."""
    (sketch,) = blocks("yaml", readme_section())
    (config,) = blocks("yaml")
    full, shown = yaml.safe_load(config), yaml.safe_load(sketch)
    for section, keys in shown.items():
        for key, value in keys.items():
            assert full[section][key] == value, (section, key)
    assert "docs/byo.md" in readme_section()


def test_the_readme_model_and_data_train(tmp_path: Path):
    (python,) = blocks("python")
    (config,) = blocks("yaml")
    assert len(python.splitlines()) <= 35
    assert "PYTHONPATH=. fltool train byo.yaml" in "\n".join(blocks("bash"))
    (tmp_path / "mine.py").write_text(python)
    (tmp_path / "byo.yaml").write_text(config)
    run_dir = tmp_path / "run"
    env = {**{k: v for k, v in os.environ.items() if k != "PYTHONPATH"}, "PYTHONPATH": ".", "OMP_NUM_THREADS": "1"}
    args = [str(FLTOOL), "train", "byo.yaml", "device=cpu", f"output.run_dir={run_dir}"]  # all 20 rounds: seconds
    done = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "federated.engine: auto chose vectorized" in done.stderr
    rows = read_metrics(run_dir)
    assert len(rows) == 20 and rows[-1]["test_accuracy"] > 0.95  # as the README says

    # K is the number of writers with at least min_examples training examples
    stored = yaml.safe_load((run_dir / "config.yaml").read_text())
    namespace: dict = {}
    exec(compile(python, "mine.py", "exec"), namespace)
    _, _, writer = namespace["writers"](**stored["data"]["init_args"])
    counts = torch.bincount(writer)
    assert stored["federated"]["num_clients"] == int((counts >= stored["data"]["min_examples"]).sum()) > 0
    assert stored["model"] == {"name": "mlp", "class_path": "mine:TinyResNet", "init_args": {"width": 8}}
