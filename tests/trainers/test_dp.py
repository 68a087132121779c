"""DP in whole `train_federated` runs: both engines release the same noised rounds, a
resumed run ends bit for bit where the straight one does, every row carries the epsilon
spent so far, and dp.max_epsilon ends the run before a round would overspend."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from fltool.config import config_from_dict
from fltool.errors import FltoolError
from fltool.run.checkpoint import load_checkpoint
from fltool.run.metrics import read_metrics
from fltool.run.rundir import create_run_dir, last_checkpoint
from fltool.run.runs_table import run_info
from fltool.trainers.availability import plan_round
from fltool.trainers.federated import train_federated
from fltool.trainers.privacy_budget import budget_for
from tests.conftest import train_maybe_interrupted

pytestmark = pytest.mark.usefixtures("one_thread")

ROUNDS = 3


def make_config(root: Path, engine: str = "sequential", **sections: Any):
    fed = {"num_clients": 20, "fraction": 0.3, "rounds": ROUNDS, "local_epochs": 1, "batch_size": 8, "lr": 0.1, "engine": engine}
    fed.update(sections.pop("federated", {}))
    raw = {
        "seed": 2,
        "device": "cpu",
        "data": {"dataset": "synthetic", "synthetic": {"train_size": 400, "test_size": 40, "shape": [1, 8, 8]}},
        "model": {"name": "mlp"},
        "federated": fed,
        "eval": {"every": ROUNDS},
        "output": {"dir": str(root), "checkpoint_every": 1},
        **sections,
    }
    return config_from_dict(raw, "dp")


SETTINGS = {
    "central-fixed": {"dp": {"mode": "central", "clip_norm": 0.5, "noise_multiplier": 0.8}},
    "central-poisson-adaptive": {
        "dp": {"mode": "central", "clip_norm": 0.5, "noise_multiplier": 0.8, "adaptive_clipping": True, "count_noise": 1.0},
        "federated": {"sampling": "poisson"},
    },
    "central-target-epsilon": {"dp": {"mode": "central", "target_epsilon": 5.0}, "federated": {"sampling": "poisson"}},
    "local": {"dp": {"mode": "local", "clip_norm": 1.0, "noise_multiplier": 0.05}},
    "local+fedprox": {"dp": {"mode": "local", "clip_norm": 1.0, "noise_multiplier": 0.05}, "algorithm": {"name": "fedprox", "mu": 0.1}},
    # compression before central clipping (the server clips what it decoded), after local noise
    "central+qsgd": {"dp": {"mode": "central", "clip_norm": 0.5, "noise_multiplier": 0.8}, "compression": {"name": "qsgd", "bits": 4}},
    "local+topk-ef": {
        "dp": {"mode": "local", "clip_norm": 1.0, "noise_multiplier": 0.05}, "compression": {"name": "topk", "fraction": 0.1},
    },
}


def run(root: Path, engine: str, name: str, interrupt_after: int | None = None):
    return train_maybe_interrupted(make_config(root, engine, **SETTINGS[name]), interrupt_after)


@pytest.mark.parametrize("name", list(SETTINGS))
def test_engines_agree_resume_is_bitwise_and_rows_carry_epsilon(tmp_path, name):
    seq, seq_rows, _ = run(tmp_path / "seq", "sequential", name)
    vec, vec_rows, _ = run(tmp_path / "vec", "vectorized", name)
    for k in seq.model:
        torch.testing.assert_close(vec.model[k], seq.model[k], rtol=1e-4, atol=1e-5)
    budget = budget_for(make_config(tmp_path, **SETTINGS[name]))
    assert [r["epsilon"] for r in vec_rows] == [budget.epsilon(r) for r in range(1, ROUNDS + 1)]
    assert all(0 < a < b for a, b in zip([r["epsilon"] for r in vec_rows], [r["epsilon"] for r in vec_rows[1:]]))
    assert {r["dp_sampling"] for r in vec_rows} == {SETTINGS[name].get("federated", {}).get("sampling", "fixed")}
    resumed, rows, _ = run(tmp_path / "resumed", "vectorized", name, interrupt_after=1)
    for k in vec.model:
        assert torch.equal(resumed.model[k], vec.model[k]), k
    untimed = lambda rs: [{k: v for k, v in r.items() if k not in ("wall_s", "elapsed_s")} for r in rs]  # noqa: E731
    assert untimed(rows) == untimed(vec_rows)
    if "adaptive" in name:
        assert len({r["dp_clip_norm"] for r in rows}) == ROUNDS  # the clip norm moved, and resumed where it was


def test_target_epsilon_is_spent_exactly_by_the_last_round_pld_too(tmp_path):
    """(The PLD accountant costs seconds per epsilon: one short run of it.)"""
    for accountant in ("rdp", "pld"):
        settings = {"dp": {"mode": "central", "target_epsilon": 5.0, "accountant": accountant}, "federated": {"sampling": "poisson"}}
        _, rows, _ = train_maybe_interrupted(make_config(tmp_path / accountant, "vectorized", **settings))
        assert 5.0 * 0.99 <= rows[-1]["epsilon"] <= 5.0


def test_max_epsilon_stops_before_the_round_that_would_exceed_it(tmp_path):
    settings = {"dp": {"mode": "central", "clip_norm": 0.5, "noise_multiplier": 0.8}}
    budget = budget_for(make_config(tmp_path, **settings))
    cap = (budget.epsilon(2) + budget.epsilon(3)) / 2  # room for 2 rounds, not 3
    cfg = make_config(tmp_path, federated={"rounds": 5}, dp={**settings["dp"], "max_epsilon": cap})
    run_dir = create_run_dir(cfg)
    summary = train_federated(cfg, run_dir)
    rows = read_metrics(run_dir)
    assert [r["round"] for r in rows] == [1, 2] and rows[-1]["epsilon"] <= cap
    assert summary.stopped.startswith(f"privacy budget: round 3 would bring epsilon to {budget.epsilon(3):.4g}")
    assert rows[-1]["stopped"] == summary.stopped and "stopped" not in rows[0]  # where `fltool runs` reads it
    again = train_federated(cfg, run_dir, resume=load_checkpoint(last_checkpoint(run_dir)))  # a resume spends nothing
    assert len(read_metrics(run_dir)) == 2 and again.stopped == summary.stopped
    assert read_metrics(run_dir) == rows
    info = run_info(run_dir)
    assert (info.status, info.stopped) == ("stopped", summary.stopped)


def test_a_max_epsilon_below_one_round_is_refused_before_training(tmp_path):
    cfg = make_config(tmp_path, dp={"mode": "central", "noise_multiplier": 0.8, "max_epsilon": 0.01})
    with pytest.raises(FltoolError, match="dp.max_epsilon: 0.01 is below the epsilon of a single round"):
        budget_for(cfg)


@pytest.mark.parametrize(
    "dp, message",
    [
        # PLD ran out of 6 GB at this one (RDP epsilon 1244; 721 already did)
        ({"mode": "central", "noise_multiplier": 0.03}, r"dp.noise_multiplier: z = 0.03 spends epsilon 1\d{3} over 3 rounds \(by RDP\)"),
        ({"mode": "local", "noise_multiplier": 0.1}, r"dp.noise_multiplier: z = 0.1 spends epsilon [\d.]+ over 3 rounds"),
        ({"mode": "central", "target_epsilon": 500}, r"dp.target_epsilon: 500: the PLD accountant's grid grows with epsilon"),
    ],
)
def test_pld_past_its_range_is_refused_before_it_fills_memory(tmp_path, dp, message):
    cfg = make_config(tmp_path, federated={"sampling": "poisson", "fraction": 1.0}, dp={**dp, "accountant": "pld"})
    with pytest.raises(FltoolError, match=message) as info:
        budget_for(cfg)
    assert info.value.lines[0].endswith(("use dp.accountant rdp", "raise z, or use dp.accountant rdp"))
    rdp = make_config(tmp_path, federated={"sampling": "poisson", "fraction": 1.0}, dp=dp)
    assert budget_for(rdp) is not None  # RDP accounts for it, in milliseconds


def test_os_noise_runs_and_is_not_reproducible(tmp_path):
    settings = {"dp": {"mode": "central", "clip_norm": 0.5, "noise_multiplier": 0.8, "noise_source": "os"}}
    models = []
    for i in range(2):
        cfg = make_config(tmp_path / str(i), **settings)
        run_dir = create_run_dir(cfg)
        train_federated(cfg, run_dir)
        models.append(load_checkpoint(last_checkpoint(run_dir)).model)
    a, b = models
    assert any(not torch.equal(a[k], b[k]) for k in a)


def test_poisson_cohorts_are_seeded_and_sized_q_k_on_average(tmp_path):
    cfg = make_config(tmp_path, federated={"sampling": "poisson", "num_clients": 200, "fraction": 0.1})
    sizes = [1] * 200
    plans = [plan_round(cfg, sizes, r, []) for r in range(1, 401)]
    assert plans == [plan_round(cfg, sizes, r, []) for r in range(1, 401)]
    counts = torch.tensor([len(p.sampled) for p in plans], dtype=torch.float64)
    assert counts.mean().item() == pytest.approx(20, abs=0.6)  # sd of the mean: sqrt(18 / 400) = 0.21
    assert counts.var().item() == pytest.approx(18, rel=0.25)  # binomial: K q (1 - q)
    tiny = make_config(tmp_path, federated={"sampling": "poisson", "num_clients": 20, "fraction": 0.02})
    empty = [p for p in (plan_round(tiny, [1] * 20, r, []) for r in range(1, 200)) if not p.sampled]
    assert empty and all(p.skipped and p.attempts == 1 for p in empty)  # never drawn again
