"""Shared fixtures. Real-data tests take MNIST from $FLTOOL_DATA (default ../shared/data)
and FAIL, never skip, when it is missing."""

from __future__ import annotations

import os
from pathlib import Path

# Several pytest workers share few cores: torch's default of one OpenMP thread per core
# spin-waits against the other workers (a 6-round run of the tiny config below took 32 s
# of wall time on a loaded 2-core machine, 1.5 s with one thread). Set before torch is
# imported, so that every worker and every subprocess it starts inherits it.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from fltool.config import Config, config_from_dict
from fltool.run.checkpoint import Checkpoint

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"


def shared_data_root() -> Path:
    return Path(os.environ.get("FLTOOL_DATA") or REPO.parent / "shared" / "data").resolve()


@pytest.fixture(scope="session", autouse=True)
def _data_env(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Point every in-process and subprocess run at the shared data and a private cache."""
    os.environ["FLTOOL_DATA"] = str(shared_data_root())
    os.environ.setdefault("FLTOOL_CACHE", str(tmp_path_factory.mktemp("fltool-cache")))


@pytest.fixture(scope="session")
def mnist_root() -> Path:
    root = shared_data_root()
    needed = root / "MNIST" / "raw" / "train-images-idx3-ubyte.gz"
    if not needed.is_file():
        pytest.fail(f"MNIST is missing: expected {needed} (set FLTOOL_DATA); data tests must not skip")
    return root


def tiny_config(tmp_path: Path, **sections: dict | object) -> Config:
    """A fast synthetic experiment; keyword arguments override sections or top-level keys."""
    raw: dict = {
        "name": "tiny",
        "mode": "federated",
        "algorithm": {"name": "fedavg"},
        "seed": 0,
        "device": "cpu",
        "data": {"dataset": "synthetic", "partition": "iid", "synthetic": {"train_size": 400, "test_size": 200, "shape": [1, 8, 8]}},
        "model": {"name": "mlp"},
        "federated": {"num_clients": 8, "fraction": 0.5, "rounds": 3, "local_epochs": 2, "batch_size": 16, "lr": 0.1},
        "eval": {"every": 1},
        "output": {"dir": str(tmp_path / "runs")},
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(raw.get(key), dict):
            raw[key] = {**raw[key], **value}
        else:
            raw[key] = value
    return config_from_dict(raw, "tiny")


@pytest.fixture
def make_config(tmp_path: Path):
    return lambda **sections: tiny_config(tmp_path, **sections)


@pytest.fixture
def interrupt_checkpoint_write(monkeypatch: pytest.MonkeyPatch):
    """patch(module, round_, when): make `module.save_checkpoint` act like Ctrl-C just
    `before` or `after` it writes round `round_`'s checkpoint (a new patch replaces the
    last one; `monkeypatch.undo()` restores the real function)."""
    originals: dict[int, object] = {}

    def patch(module: object, round_: int, when: str) -> None:
        real_save = originals.setdefault(id(module), module.save_checkpoint)

        def interrupting_save(state: Checkpoint, path: Path) -> None:
            if state.round == round_ and when == "before":
                raise KeyboardInterrupt
            real_save(state, path)
            if state.round == round_ and when == "after":
                raise KeyboardInterrupt

        monkeypatch.setattr(module, "save_checkpoint", interrupting_save)

    return patch


@pytest.fixture
def one_thread():
    """For tests of tiny tensors: one torch thread is faster than two contending."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def train_maybe_interrupted(cfg: Config, interrupt_after: int | None = None):
    """`train_federated` on a fresh run directory of `cfg`: straight through, or stopped
    like Ctrl-C after round `interrupt_after` was logged and then resumed from its
    checkpoint. Returns (last checkpoint, metric rows, summary of the last call)."""
    from fltool.run.checkpoint import load_checkpoint
    from fltool.run.metrics import read_metrics
    from fltool.run.rundir import create_run_dir, last_checkpoint
    from fltool.trainers.federated import train_federated

    run_dir = create_run_dir(cfg)

    def interrupt(row: dict) -> None:
        if row["round"] == interrupt_after:
            raise KeyboardInterrupt

    if interrupt_after:
        with pytest.raises(KeyboardInterrupt):
            train_federated(cfg, run_dir, on_round=interrupt)
        summary = train_federated(cfg, run_dir, resume=load_checkpoint(last_checkpoint(run_dir)))
    else:
        summary = train_federated(cfg, run_dir)
    return load_checkpoint(last_checkpoint(run_dir)), read_metrics(run_dir), summary
