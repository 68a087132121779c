"""scripts/reproduce_mcmahan.py: its cells match configs/paper/mcmahan2017/, it picks the
best lr from what the runs measured, and one command runs a cell's grid (on synthetic
data here) and prints the table; a rerun with the same --dir trains nothing more."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import yaml

from fltool.config import load_config

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "reproduce_mcmahan.py"


def load_script():
    spec = importlib.util.spec_from_file_location("reproduce_mcmahan", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # (dataclasses look their module up by name)
    spec.loader.exec_module(module)
    return module


m = load_script()


def test_every_cell_has_a_config_a_paper_number_and_a_grid():
    configs = sorted(p.stem for p in m.CONFIGS.glob("*.yaml"))
    assert sorted(m.PAPER_ROUNDS) == sorted(m.GRIDS) == configs
    for cell, paper in m.PAPER_ROUNDS.items():
        cfg = load_config(m.CONFIGS / f"{cell}.yaml")
        assert cfg.eval.target_accuracy == (0.97 if cell.startswith("2nn") else 0.99)
        assert cfg.eval.every == 1 and cfg.federated.rounds > paper  # room to reach it
        assert cfg.data.partition == ("shards" if cell.endswith("noniid") else "iid")
        assert cfg.algorithm.name == ("fedsgd" if "fedsgd" in cell else "fedavg")


def test_cells_are_chosen_by_model_or_name():
    assert m.select_cells("2nn") == [c for c in m.PAPER_ROUNDS if c.startswith("2nn_")]
    assert m.select_cells("cnn_fedavg_e5_b10_iid,2nn_fedsgd") == ["cnn_fedavg_e5_b10_iid", "2nn_fedsgd_iid", "2nn_fedsgd_noniid"]
    with pytest.raises(SystemExit, match="no cell 'nope'"):
        m.select_cells("nope")


def fake_run(path: Path, accuracies: list[float], rounds: int = 200, target: float = 0.97, nan_from: int = 0) -> None:
    """A run directory as fltool writes it, as far as `fltool runs` reads one; from round
    `nan_from` on its loss is NaN, which metrics.jsonl writes as null."""
    path.mkdir(parents=True)
    cfg = {"name": "x", "mode": "federated", "federated": {"rounds": rounds}, "eval": {"target_accuracy": target}}
    (path / "config.yaml").write_text(yaml.safe_dump(cfg))
    rows = [
        {"round": i + 1, "test_accuracy": a, "test_loss": None if nan_from and i + 1 >= nan_from else 0.1, "elapsed_s": float(i)}
        for i, a in enumerate(accuracies)
    ]
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_the_best_lr_is_the_fewest_rounds_every_seed_reached(tmp_path: Path):
    cell = tmp_path / "2nn_fedavg_e1_b10_iid"
    fake_run(cell / "lr=0.05" / "000", [0.9, 0.96, 0.971])  # round 3
    fake_run(cell / "lr=0.1" / "000", [0.9, 0.975])  # round 2, but its second seed missed
    fake_run(cell / "lr=0.1" / "001", [0.9, 0.95, 0.96], rounds=3)
    fake_run(cell / "lr=0.2" / "000", [0.5, 0.6], rounds=5)  # unfinished: no checkpoint, status failed
    fake_run(cell / "lr=0.4" / "000", [0.9, 0.95, 0.0, 0.0], rounds=4, nan_from=3)
    results = m.read_cell(tmp_path, "2nn_fedavg_e1_b10_iid")
    assert [r.lr for r in results] == ["0.05", "0.1", "0.2", "0.4"]
    assert m.best_of(results).lr == "0.05"
    text = m.table(tmp_path, ["2nn_fedavg_e1_b10_iid", "2nn_fedsgd_iid"])
    line = next(ln for ln in text.splitlines() if ln.startswith("2nn_fedavg_e1_b10_iid"))
    assert line.split()[:5] == ["2nn_fedavg_e1_b10_iid", "87", "3", f"{3 / 87:.2f}", "0.05"]
    assert "0.1: >3 (0.9600), 1/2 seeds reached" in line and "0.2: >=2 (0.6000) unfinished" in line
    assert "0.4: diverged (NaN) at round 3 (0.9500)" in line
    assert "not run" in next(ln for ln in text.splitlines() if ln.startswith("2nn_fedsgd_iid"))


def test_one_command_runs_the_grid_and_a_rerun_reuses_it(tmp_path: Path, capfd):
    synthetic = [
        "data.dataset=synthetic", "data.synthetic.train_size=600", "data.synthetic.test_size=100",
        "data.synthetic.shape=[1,28,28]", "device=cpu", "federated.rounds=3", "eval.target_accuracy=0.15",
    ]  # fmt: skip
    argv = ["--cells", "2nn_fedavg_e1_b10_iid", "--grid", "0.1", "--dir", str(tmp_path), *(a for s in synthetic for a in ("--set", s))]
    assert m.main(argv) == 0
    out = capfd.readouterr().out  # (the sweeps are subprocesses: their output is the fd's)
    run = tmp_path / "2nn_fedavg_e1_b10_iid" / "lr=0.1" / "000"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    reached = next(r["round"] for r in rows if r["test_accuracy"] >= 0.15)  # what the table must say
    line = next(ln for ln in out.splitlines() if ln.startswith("2nn_fedavg_e1_b10_iid"))
    assert line.split()[:3] == ["2nn_fedavg_e1_b10_iid", "87", str(reached)]
    assert m.main(argv) == 0
    assert "finished already, skipped" in capfd.readouterr().out
    assert len((run / "metrics.jsonl").read_text().splitlines()) == len(rows)
