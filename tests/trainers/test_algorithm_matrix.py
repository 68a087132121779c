"""Every registered algorithm on every engine, through whole `train_federated` runs.

For each algorithm (FedAvg, FedSGD, FedProx, SCAFFOLD options I and II, FedNova) on
equal (iid) and unequal (Dirichlet, label-skewed) client sizes:
(a) the sequential and vectorized engines compute the same rounds: the final model and
    the algorithm's state (SCAFFOLD's c and every c_i) agree to float tolerance;
(b) on each engine, a run interrupted after round 2 and resumed from its checkpoint
    ends bit for bit where the uninterrupted run ends: model, metrics, and the
    checkpoint's extra['algorithm'] (server state, every client's state, the server
    optimizer's state), also with FedAdam on the server and the median aggregator.

Tiny on purpose (8x8 synthetic images, 10 clients, C = 0.4, 4 rounds): each
uninterrupted run is made once and shared by (a) and (b).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from fltool.algorithms import ALGORITHMS as REGISTERED
from fltool.config import config_from_dict
from fltool.run.checkpoint import Checkpoint, load_checkpoint
from fltool.run.metrics import read_metrics
from fltool.run.rundir import create_run_dir, last_checkpoint
from fltool.trainers.federated import train_federated

ROUNDS, INTERRUPT_AFTER = 4, 2
NUM_CLIENTS = 10

ALGORITHMS: dict[str, dict[str, Any]] = {
    "fedavg": {"name": "fedavg"},
    "fedsgd": {"name": "fedsgd"},
    "fedprox": {"name": "fedprox", "mu": 0.5},
    "scaffold1": {"name": "scaffold", "option": 1},
    "scaffold2": {"name": "scaffold", "option": 2},
    "fednova": {"name": "fednova"},
}
PARTITIONS = {"equal": {"partition": "iid"}, "unequal": {"partition": "dirichlet", "alpha": 0.5}}
# server optimizer / aggregator variants, resumed on unequal clients
VARIANTS: dict[str, dict[str, Any]] = {
    "fedavg+adam": {"algorithm": ALGORITHMS["fedavg"], "server_optimizer": {"name": "adam", "lr": 0.05, "bias_correction": True}},
    "scaffold2+adam": {"algorithm": ALGORITHMS["scaffold2"], "server_optimizer": {"name": "adam", "lr": 0.05}},
    "fedavg+momentum": {"algorithm": ALGORITHMS["fedavg"], "server_optimizer": {"name": "sgd", "lr": 1.0, "momentum": 0.9}},
    "fedavg+median": {"algorithm": ALGORITHMS["fedavg"], "aggregator": {"name": "median"}},
    "fednova+median": {"algorithm": ALGORITHMS["fednova"], "aggregator": {"name": "median"}},
}
ENGINES = ["sequential", "vectorized"]


pytestmark = pytest.mark.usefixtures("one_thread")


def test_the_matrix_covers_every_registered_algorithm():
    assert {a["name"] for a in ALGORITHMS.values()} == set(REGISTERED.names())


def make_config(root: Path, engine: str, partition: str, algorithm: dict, **sections: dict):
    raw = {
        "seed": 3,
        "device": "cpu",
        "data": {"dataset": "synthetic", **PARTITIONS[partition], "synthetic": {"train_size": 200, "test_size": 40, "shape": [1, 8, 8]}},
        "model": {"name": "mlp"},
        "federated": {"num_clients": NUM_CLIENTS, "fraction": 0.4, "rounds": ROUNDS, "local_epochs": 1, "batch_size": 8, "lr": 0.05, "engine": engine},
        "algorithm": algorithm,
        "eval": {"every": ROUNDS},
        "output": {"dir": str(root), "checkpoint_every": INTERRUPT_AFTER},
        **sections,
    }
    return config_from_dict(raw, "matrix")


_full_runs: dict[tuple, tuple[Checkpoint, list[dict]]] = {}


def full_run(tmp_path_factory: pytest.TempPathFactory, engine: str, partition: str, name: str) -> tuple[Checkpoint, list[dict]]:
    """The uninterrupted run's last checkpoint and metrics (made once per session)."""
    key = (engine, partition, name)
    if key not in _full_runs:
        cfg = config_for(tmp_path_factory.mktemp("full"), engine, partition, name)
        run_dir = create_run_dir(cfg)
        train_federated(cfg, run_dir)
        _full_runs[key] = load_checkpoint(last_checkpoint(run_dir)), read_metrics(run_dir)
    return _full_runs[key]


def config_for(root: Path, engine: str, partition: str, name: str):
    if name in ALGORITHMS:
        return make_config(root, engine, partition, ALGORITHMS[name])
    return make_config(root, engine, partition, **VARIANTS[name])


def untimed(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k not in ("wall_s", "elapsed_s")} for row in rows]


def tensors_of(state: Any, prefix: str = "") -> dict[str, torch.Tensor]:
    """The tensors of a nested dict/list state, by path."""
    if isinstance(state, torch.Tensor):
        return {prefix: state}
    items = state.items() if isinstance(state, dict) else enumerate(state)
    out: dict[str, torch.Tensor] = {}
    for k, v in items:
        out.update(tensors_of(v, f"{prefix}/{k}"))
    return out


def assert_same_structure(a: Any, b: Any) -> tuple[dict, dict]:
    ta, tb = tensors_of(a), tensors_of(b)
    assert ta.keys() == tb.keys()
    for k in ta:
        assert ta[k].shape == tb[k].shape and ta[k].dtype == tb[k].dtype, k
    return ta, tb


@pytest.mark.parametrize("partition", list(PARTITIONS))
@pytest.mark.parametrize("name", list(ALGORITHMS))
def test_engines_agree(tmp_path_factory, name, partition):
    """(a) sequential and vectorized engines: the same model and algorithm state after
    ROUNDS rounds, to float tolerance (only summation order differs)."""
    seq, seq_rows = full_run(tmp_path_factory, "sequential", partition, name)
    vec, vec_rows = full_run(tmp_path_factory, "vectorized", partition, name)
    assert seq.round == vec.round == ROUNDS
    for k in seq.model:
        torch.testing.assert_close(vec.model[k], seq.model[k], rtol=1e-4, atol=1e-5)
    ta, tb = assert_same_structure(seq.extra["algorithm"], vec.extra["algorithm"])
    for k in ta:
        torch.testing.assert_close(tb[k], ta[k], rtol=1e-4, atol=1e-5, msg=lambda m, k=k: f"{k}: {m}")
    assert [r["client_ids"] for r in seq_rows] == [r["client_ids"] for r in vec_rows]
    for a, b in zip(seq_rows, vec_rows):
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-4)
    # the runs trained, and SCAFFOLD kept a c_i for exactly the clients it sampled
    assert seq_rows[-1]["train_loss"] < seq_rows[0]["train_loss"] or name == "fedsgd", seq_rows
    if name.startswith("scaffold"):
        clients = seq.extra["algorithm"]["clients"]["c"]
        touched = {int(k) for r in seq_rows for k in r["client_ids"]}
        assert len(touched) < NUM_CLIENTS  # some client was never sampled: its c_i stays 0
        for k in range(NUM_CLIENTS):
            assert bool(clients[0][k].any()) == (k in touched)


@pytest.mark.parametrize("name", ["scaffold2", "fednova", "fedavg+median", "scaffold1"])
def test_vectorized_engine_in_chunks_agrees(tmp_path, tmp_path_factory, name):
    """(a) with the cohort of 4 split into chunks of 3 and 1: uploads streamed into the
    aggregator and client rows written chunk by chunk give the same run."""
    seq, _ = full_run(tmp_path_factory, "sequential", "unequal", name)
    cfg = config_for(tmp_path, "vectorized", "unequal", name)
    cfg.federated.max_parallel_clients = 3
    run_dir = create_run_dir(cfg)
    train_federated(cfg, run_dir)
    chunked = load_checkpoint(last_checkpoint(run_dir))
    for k in seq.model:
        torch.testing.assert_close(chunked.model[k], seq.model[k], rtol=1e-4, atol=1e-5)
    ta, tb = assert_same_structure(seq.extra["algorithm"], chunked.extra["algorithm"])
    for k in ta:
        torch.testing.assert_close(tb[k], ta[k], rtol=1e-4, atol=1e-5, msg=lambda m, k=k: f"{k}: {m}")


def resumed_run(root: Path, cfg) -> tuple[Checkpoint, list[dict]]:
    """Interrupted (Ctrl-C) after round INTERRUPT_AFTER, then resumed to the end."""

    def interrupt(row: dict) -> None:
        if row["round"] == INTERRUPT_AFTER:
            raise KeyboardInterrupt

    run_dir = create_run_dir(cfg)
    with pytest.raises(KeyboardInterrupt):
        train_federated(cfg, run_dir, on_round=interrupt)
    ckpt = load_checkpoint(last_checkpoint(run_dir))
    assert ckpt.round == INTERRUPT_AFTER
    train_federated(cfg, run_dir, resume=ckpt)
    return load_checkpoint(last_checkpoint(run_dir)), read_metrics(run_dir)


def assert_resume_is_bitwise(tmp_path, tmp_path_factory, engine, partition, name):
    full, full_rows = full_run(tmp_path_factory, engine, partition, name)
    resumed, rows = resumed_run(tmp_path, config_for(tmp_path, engine, partition, name))
    assert resumed.round == full.round == ROUNDS
    assert full.model.keys() == resumed.model.keys()
    for k in full.model:
        assert torch.equal(full.model[k], resumed.model[k]), k
    ta, tb = assert_same_structure(full.extra["algorithm"], resumed.extra["algorithm"])
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k
    assert untimed(rows) == untimed(full_rows)
    return full


@pytest.mark.parametrize("partition", list(PARTITIONS))
@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("name", list(ALGORITHMS))
def test_resume_is_bitwise_equal(tmp_path, tmp_path_factory, name, engine, partition):
    """(b) 4 rounds straight == 2 rounds, Ctrl-C, resume to 4: bit for bit."""
    full = assert_resume_is_bitwise(tmp_path, tmp_path_factory, engine, partition, name)
    state = full.extra["algorithm"]
    if name.startswith("scaffold"):
        assert state["server"]["c"] and state["clients"]["c"]
    else:
        assert state["server"] == {} and state["clients"] == {}


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("name", list(VARIANTS))
def test_resume_is_bitwise_equal_with_server_optimizers_and_aggregators(tmp_path, tmp_path_factory, name, engine):
    """(b) with FedAdam's m, v, t and FedAvgM's momentum in the checkpoint, and the median."""
    full = assert_resume_is_bitwise(tmp_path, tmp_path_factory, engine, "unequal", name)
    optimizer = full.extra["algorithm"]["optimizer"]
    if "adam" in name:
        assert set(optimizer) == {"m", "v", "step"} and optimizer["step"][0].item() == ROUNDS
    elif "momentum" in name:
        assert set(optimizer) == {"momentum"}
    else:
        assert optimizer == {}
