"""Every shipped config validates as written, and runs for real: one round (or epoch)
on a small synthetic set, with the file's own mode, algorithm, server optimizer,
aggregator, partition, model, engine and local rule."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from fltool.cli import app
from fltool.config import dump_config, load_config
from fltool.config.registry import AGGREGATORS, ALGORITHMS, ATTACKS, COMPRESSORS, SERVER_OPTIMIZERS
from fltool.data import data_shape
from fltool.run.metrics import read_metrics

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
# every file under configs/, the paper reproductions in configs/paper/ too
CONFIGS = sorted(CONFIG_DIR.rglob("*.yaml"))
REGISTRIES = {
    "algorithm": ALGORITHMS,
    "server_optimizer": SERVER_OPTIMIZERS,
    "aggregator": AGGREGATORS,
    "attack": ATTACKS,
    "compression": COMPRESSORS,
}

# MNIST's shape, so each file's model sees the inputs it was written for, but 600
# examples: every file's partition still fits (100 clients x 2 shards = 200 shards), and
# a round of 10 clients takes well under a second on 2 CPU cores.
SYNTHETIC = [
    "data.dataset=synthetic",
    "data.synthetic.train_size=600",
    "data.synthetic.test_size=100",
    "device=cpu",
]
FAST = {
    "federated": [*SYNTHETIC, "federated.rounds=1"],
    "ddp": [*SYNTHETIC, "data.synthetic.shape=[1,12,12]", "ddp.epochs=1", "ddp.warmup_steps=2"],
}


def test_there_are_configs_for_both_modes():
    modes = {load_config(path).mode for path in CONFIGS}
    assert modes == {"federated", "ddp"}


def test_the_shipped_configs_use_every_builtin_choice():
    """Each built-in algorithm, server optimizer, aggregator and attack has a shipped
    config, which the tests below run."""
    federated = [load_config(path) for path in CONFIGS if load_config(path).mode == "federated"]
    for section, registry in REGISTRIES.items():
        assert {getattr(cfg, section).name for cfg in federated} == set(registry.names()), section


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.relative_to(CONFIG_DIR).as_posix())
def test_config_validates_as_written(path: Path, tmp_path: Path):
    cfg = load_config(path)
    assert cfg.name == path.stem
    raw = yaml.safe_load(path.read_text())
    for section, registry in REGISTRIES.items():
        chosen = getattr(cfg, section)
        assert type(chosen) is registry.config_class(chosen.name)
        # every key the file sets is what loaded (none silently dropped or defaulted)
        for key, value in (raw.get(section) or {}).items():
            assert getattr(chosen, key) == value, f"{section}.{key}"
    resolved = tmp_path / "resolved.yaml"
    resolved.write_text(dump_config(cfg))
    assert load_config(resolved) == cfg


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.relative_to(CONFIG_DIR).as_posix())
def test_config_runs_one_round_on_synthetic_data(path: Path, tmp_path: Path):
    cfg = load_config(path)
    overrides = [*FAST[cfg.mode], f"output.run_dir={tmp_path / 'run'}"]
    if cfg.mode == "federated" and cfg.data.dataset != "mnist":  # synthetic data of the file's dataset's shape
        shape, classes = data_shape(cfg.data)
        overrides += [f"data.synthetic.shape=[{','.join(map(str, shape))}]", f"data.synthetic.num_classes={classes}"]
    if cfg.mode == "federated" and cfg.federated.num_clients > 300:  # enough examples for every client's shards
        overrides.append(f"data.synthetic.train_size={2 * cfg.federated.num_clients}")
    result = CliRunner().invoke(app, ["train", str(path), *overrides])
    assert result.exit_code == 0, result.output
    run_dir = tmp_path / "run"
    rows = read_metrics(run_dir)
    assert len(rows) == 1 and rows[0]["test_accuracy"] is not None
    assert rows[0]["train_loss"] == rows[0]["train_loss"]  # not NaN
    ran = load_config(run_dir / "config.yaml")
    assert (ran.mode, ran.model, ran.data.partition) == (cfg.mode, cfg.model, cfg.data.partition)
    saved = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    assert saved["round"] == 1
    if cfg.mode == "federated":
        assert (ran.algorithm, ran.server_optimizer, ran.aggregator) == (cfg.algorithm, cfg.server_optimizer, cfg.aggregator)
        assert (ran.clients, ran.attack) == (cfg.clients, cfg.attack)
        if cfg.attack.name != "none" and cfg.attack.fraction > 0:
            assert "malicious_ids" in rows[0]
        if cfg.clients.stragglers > 0:
            assert "straggler_ids" in rows[0]
        if cfg.federated.sampling == "fixed":
            assert rows[0]["clients"] == round(cfg.federated.fraction * cfg.federated.num_clients)
        assert {"server", "clients", "optimizer"} <= set(saved["extra"]["algorithm"])
        if cfg.dp.mode != "none":
            assert rows[0]["epsilon"] > 0 and rows[0]["dp_sampling"] == cfg.federated.sampling
