"""Dropouts, stragglers and attackers in whole `train_federated` runs.

- The round plan (who is sampled, drops out, straggles, is malicious) is a pure
  function of (seed, round, attempt): equal on every call, and without faults equal to
  plain sampling.
- Both engines compute the same faulty rounds (stragglers' partial work, each attack).
- A faulty run interrupted and resumed ends bit for bit where the straight run ends.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from fltool.algorithms.local import steps_per_epoch
from fltool.algorithms.sampling import generator_for, sample_clients
from fltool.config import config_from_dict
from fltool.errors import FltoolError
from fltool.run.checkpoint import load_checkpoint
from fltool.run.metrics import read_metrics
from fltool.run.rundir import create_run_dir, last_checkpoint
from fltool.trainers.availability import MAX_ATTEMPTS, malicious_for_run, plan_round
from fltool.trainers.federated import train_federated
from tests.conftest import train_maybe_interrupted

pytestmark = pytest.mark.usefixtures("one_thread")

ROUNDS = 3


def make_config(root: Path | None = None, engine: str = "sequential", device: str = "cpu", **sections: Any):
    fed = {"num_clients": 10, "fraction": 0.5, "rounds": ROUNDS, "local_epochs": 2, "batch_size": 8, "lr": 0.05, "engine": engine}
    fed.update(sections.pop("federated", {}))
    raw = {
        "seed": 5,
        "device": device,
        "data": {"dataset": "synthetic", "partition": "dirichlet", "alpha": 0.5, "synthetic": {"train_size": 200, "test_size": 40, "shape": [1, 8, 8]}},
        "model": {"name": "mlp"},
        "federated": fed,
        "eval": {"every": ROUNDS},
        "output": {"dir": str(root or "runs"), "checkpoint_every": 1},
        **sections,
    }
    return config_from_dict(raw, "faults")


SIZES = [10, 25, 40, 8, 17, 30, 22, 9, 14, 25]


def test_without_faults_the_plan_is_plain_sampling():
    cfg = make_config()
    for r in (1, 2, 7):
        plan = plan_round(cfg, SIZES, r, [])
        assert plan.sampled == plan.returned == sample_clients(10, 0.5, generator_for(cfg.seed, "sample", r))
        assert (plan.dropped, plan.stragglers, plan.malicious, plan.attempts, plan.skipped) == ([], {}, [], 1, False)


def test_plans_are_seeded_per_round_and_repeat_exactly():
    cfg = make_config(clients={"dropout": 0.4, "stragglers": 0.4, "straggler_policy": "partial"}, attack={"name": "sign_flip", "fraction": 0.3})
    run = malicious_for_run(cfg)
    assert len(run) == 3 and run == malicious_for_run(cfg)
    plans = [plan_round(cfg, SIZES, r, run) for r in range(1, 30)]
    assert plans == [plan_round(cfg, SIZES, r, run) for r in range(1, 30)]
    assert len({tuple(p.dropped) for p in plans}) > 5  # the draws change from round to round
    for p in plans:
        assert set(p.dropped) <= set(p.sampled) and set(p.returned) == set(p.sampled) - set(p.dropped)
        assert len(p.stragglers) == 2 and set(p.stragglers) <= set(p.sampled)  # round(0.4 * 5)
        assert set(p.malicious) == set(run) & set(p.returned)
    other = make_config(seed=6, clients={"dropout": 0.4})
    assert [plan_round(other, SIZES, r, []).dropped for r in range(1, 30)] != [p.dropped for p in plans]


def test_straggler_work_is_uniform_in_whole_epochs_or_steps():
    """Li et al.: each straggler does x ~ U{1..E} epochs; or x ~ U{1..E * steps/epoch} steps."""
    for work in ("epochs", "steps"):
        cfg = make_config(clients={"stragglers": 1.0, "straggler_policy": "partial", "straggler_work": work}, federated={"local_epochs": 3})
        seen = set()
        for r in range(1, 60):
            for k, steps in plan_round(cfg, SIZES, r, []).stragglers.items():
                per_epoch = steps_per_epoch(SIZES[k], 8)
                assert 1 <= steps <= 3 * per_epoch
                if work == "epochs":
                    assert steps % per_epoch == 0
                    seen.add(steps // per_epoch)
        if work == "epochs":
            assert seen == {1, 2, 3}


def test_drop_policy_discards_stragglers_partial_keeps_them():
    drop = make_config(clients={"stragglers": 0.6, "straggler_policy": "drop"})
    partial = make_config(clients={"stragglers": 0.6, "straggler_policy": "partial"})
    for r in (1, 2, 3):
        a, b = plan_round(drop, SIZES, r, []), plan_round(partial, SIZES, r, [])
        assert a.stragglers == b.stragglers and len(a.stragglers) == 3
        assert set(a.returned) == set(a.sampled) - set(a.stragglers) and b.returned == b.sampled


def test_too_few_returned_resamples_or_skips():
    resample = make_config(clients={"dropout": 0.6, "min_returned": 4})
    skip = make_config(clients={"dropout": 0.6, "min_returned": 4, "on_too_few": "skip"})
    plans = [plan_round(resample, SIZES, r, []) for r in range(1, 20)]
    assert all(len(p.returned) >= 4 for p in plans) and any(p.attempts > 1 for p in plans)
    skipped = [plan_round(skip, SIZES, r, []) for r in range(1, 20)]
    assert [s.skipped for s in skipped] == [p.attempts > 1 for p in plans]
    hopeless = make_config(clients={"dropout": 0.999, "min_returned": 5})
    with pytest.raises(FltoolError, match=f"fewer than clients.min_returned=5 clients returned in {MAX_ATTEMPTS} draws"):
        plan_round(hopeless, SIZES, 1, [])


FAULTS: dict[str, dict[str, Any]] = {
    "dropout+resample": {"clients": {"dropout": 0.5, "min_returned": 3}},
    "stragglers-partial": {"clients": {"stragglers": 0.6, "straggler_policy": "partial", "straggler_work": "steps"}},
    "stragglers-drop+skip": {"clients": {"stragglers": 0.6, "min_returned": 3, "on_too_few": "skip"}},
    "sign_flip": {"attack": {"name": "sign_flip", "fraction": 0.3, "k": 2.0}},
    "gaussian": {"attack": {"name": "gaussian", "fraction": 0.3, "std": 0.01}},
    "label_flip": {"attack": {"name": "label_flip", "fraction": 0.3}},
    "scaling": {"attack": {"name": "scaling", "fraction": 0.2, "per": "round"}},
    "alie+median": {"attack": {"name": "alie", "fraction": 0.4, "per": "round"}, "aggregator": {"name": "median"}},
    "fedprox+stragglers": {"clients": {"stragglers": 0.5, "straggler_policy": "partial"}, "algorithm": {"name": "fedprox", "mu": 0.1}},
}


def run(root: Path, engine: str, name: str, interrupt_after: int | None = None, device: str = "cpu"):
    ckpt, rows, _ = train_maybe_interrupted(make_config(root, engine, device, **FAULTS[name]), interrupt_after)
    return ckpt, rows


@pytest.mark.parametrize("name", list(FAULTS))
def test_engines_agree_and_resume_is_bitwise(tmp_path, name):
    seq, seq_rows = run(tmp_path / "seq", "sequential", name)
    vec, vec_rows = run(tmp_path / "vec", "vectorized", name)
    for k in seq.model:
        torch.testing.assert_close(vec.model[k], seq.model[k], rtol=1e-4, atol=1e-5)
    fault_keys = ("client_ids", "returned", "dropped_ids", "straggler_ids", "malicious_ids", "skipped")
    assert [{k: r.get(k) for k in fault_keys} for r in seq_rows] == [{k: r.get(k) for k in fault_keys} for r in vec_rows]
    if "attack" in FAULTS[name]:
        assert any(r["malicious_ids"] for r in seq_rows)
    if "clients" in FAULTS[name]:
        assert any(r["returned"] < r["clients"] or r["straggler_ids"] for r in seq_rows)
    resumed, rows = run(tmp_path / "resumed", "vectorized", name, interrupt_after=1)
    for k in vec.model:
        assert torch.equal(resumed.model[k], vec.model[k]), k
    untimed = lambda rs: [{k: v for k, v in r.items() if k not in ("wall_s", "elapsed_s")} for r in rs]  # noqa: E731
    assert untimed(rows) == untimed(vec_rows)


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["stragglers-partial", "gaussian", "alie+median", "fedprox+stragglers"])
def test_faults_on_cuda_graphed_vectorized_equals_sequential(tmp_path, name):
    """On a GPU the vectorized engine replays CUDA graphs; a straggler's shorter schedule
    and the attacks' device-side masks must give the sequential engine's rounds."""
    torch.backends.cudnn.allow_tf32 = False
    seq, seq_rows = run(tmp_path / "seq", "sequential", name, device="cuda")
    vec, vec_rows = run(tmp_path / "vec", "vectorized", name, device="cuda")
    for k in seq.model:
        torch.testing.assert_close(vec.model[k], seq.model[k], rtol=1e-4, atol=1e-5)
    assert [r["client_ids"] for r in seq_rows] == [r["client_ids"] for r in vec_rows]


def test_a_skipped_round_leaves_the_model_unchanged(tmp_path):
    cfg = make_config(tmp_path, clients={"dropout": 0.9, "min_returned": 5, "on_too_few": "skip"})
    run_dir = create_run_dir(cfg)
    models = []
    train_federated(cfg, run_dir, on_round=lambda row: models.append(load_checkpoint(last_checkpoint(run_dir)).model))
    rows = read_metrics(run_dir)
    assert all(r["skipped"] and r["train_loss"] is None and r["bytes_up"] == 0 for r in rows)
    for m in models[1:]:
        assert all(torch.equal(m[k], models[0][k]) for k in m)


@pytest.mark.parametrize(
    ("sections", "message"),
    [
        ({"clients": {"dropout": 1.0}}, "clients.dropout: 1 means no client ever returns"),
        ({"clients": {"min_returned": 6}}, "clients.min_returned: 6 is more than the 5 clients a round samples"),
        ({"clients": {"stragglers": 1.0}}, "clients.stragglers: 1 with straggler_policy drop discards every client"),
        ({"clients": {"dropout": 1.5}}, "clients.dropout: must be in [0, 1], got 1.5"),
        ({"clients": {"on_too_few": "retry"}}, "clients.on_too_few: must be one of resample, skip"),
        ({"attack": {"name": "flood"}}, "attack.name: must be one of none, "),
        ({"attack": {"name": "sign_flip", "std": 1.0}}, "attack.std: unknown key"),
    ],
)
def test_bad_fault_settings_are_one_line_errors(sections, message):
    with pytest.raises(FltoolError) as err:
        make_config(**sections)
    assert message in str(err.value) and "\n" not in str(err.value)
