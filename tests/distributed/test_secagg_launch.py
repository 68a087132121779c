"""SecAgg under `fltool launch`: the ranks all-gather their clients' rows, rank 0 runs
the protocol once and sends U3 and the unmasked integer sum (or the abort) to the others.
The sum is exact integers over the same encodings, so two ranks equal one process bit
for bit, distributed DP noise included; an abort skips the round on every rank."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from ddp_helpers import load_model, run_cli, write_config

from fltool.config import config_from_dict
from fltool.run.metrics import read_metrics
from fltool.run.runner import start_run
from fltool.ui import PlainReporter

pytestmark = pytest.mark.timeout(180)


def _config(engine: str, **sections: dict) -> dict:
    return {
        "name": "secagg_launch",
        "mode": "federated",
        "seed": 1,
        "device": "cpu",
        "data": {"dataset": "synthetic", "synthetic": {"train_size": 400, "test_size": 100, "shape": [1, 8, 8], "num_classes": 4}},
        "model": {"name": "mlp"},
        # 7 clients a round: an odd cohort, split 4 + 3 over the two ranks
        "federated": {"num_clients": 10, "fraction": 0.7, "rounds": 3, "batch_size": 10, "lr": 0.1, "engine": engine},
        # the complete graph: whether a round aborts depends on the dropouts alone (seeded), not
        # on a k-regular graph drawn from the OS, so the one-process run aborts where launch does
        "secagg": {"enabled": True, "graph": "complete", "reconstruction_threshold": 3, "dropout": 0.3},
        "ddp": {"timeout_s": 30},
        **sections,
    }


def _one_and_two(tmp_path: Path, raw: dict) -> tuple[Path, Path]:
    one = start_run(config_from_dict({**raw, "output": {"run_dir": str(tmp_path / "one")}}), PlainReporter("round")).run_dir
    two = tmp_path / "two"
    done = run_cli("launch", "--nproc", "2", str(write_config(tmp_path / "c.yaml", raw)), f"output.run_dir={two}", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    return one, two


KEYS = ("client_ids", "secagg_contributors", "secagg_dropped_ids", "secagg_bytes_up_per_client", "bytes_up", "secagg_clipped")


@pytest.mark.parametrize("engine", ["sequential", "vectorized"])
def test_secagg_with_distributed_dp_under_launch_equals_one_process_bitwise(tmp_path: Path, engine: str) -> None:
    dp = {"mode": "central", "clip_norm": 0.5, "noise_multiplier": 0.8, "noise_placement": "clients"}
    one, two = _one_and_two(tmp_path, _config(engine, dp=dp))
    a, b = load_model(one), load_model(two)
    assert all(torch.equal(a[k], b[k]) for k in a)
    rows_one, rows_two = read_metrics(one), read_metrics(two)
    assert [[r[k] for k in KEYS] for r in rows_two] == [[r[k] for k in KEYS] for r in rows_one]
    assert [r["dp_sum_noise_std"] for r in rows_two] == [r["dp_sum_noise_std"] for r in rows_one]
    assert any(r["secagg_dropped_ids"] for r in rows_one)


def test_an_abort_under_launch_skips_the_round_on_every_rank(tmp_path: Path) -> None:
    """Everyone drops after sharing keys in every round: rank 0 aborts, the other rank
    learns it, and with clients.on_too_few skip both go on with the model unchanged."""
    raw = _config("sequential", clients={"on_too_few": "skip"})
    raw["secagg"] = {**raw["secagg"], "dropout": 1.0}
    one, two = _one_and_two(tmp_path, raw)
    assert [r["train_loss"] for r in read_metrics(two)] == [None] * 3
    a, b = load_model(one), load_model(two)
    assert all(torch.equal(a[k], b[k]) for k in a)
