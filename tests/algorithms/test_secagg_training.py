"""SecAgg in training: the secure mean equals the plain mean within the quantisation
error, config checks refuse what needs individual updates, and runs resume exactly."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fltool.algorithms.aggregators.mean import MeanAggregator
from fltool.algorithms.api import Upload
from fltool.algorithms.secagg import error_bound
from fltool.algorithms.secagg.aggregator import SecureMeanAggregator, protocol_params
from fltool.config import load_config
from fltool.config.schema import AggregatorConfig, SecAggConfig
from fltool.distributed.comm import Comm
from fltool.errors import FltoolError
from fltool.run.checkpoint import load_checkpoint
from fltool.run.metrics import read_metrics
from fltool.run.rundir import create_run_dir, last_checkpoint
from fltool.trainers import availability
from fltool.trainers.availability import plan_round
from fltool.trainers.federated import train_federated
from tests.conftest import train_maybe_interrupted


def _uploads(m: int, seed: int = 0) -> list[tuple[torch.Tensor, Upload]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for start in range(0, m, 3):  # chunks of 3, as an engine hands them over
        ids = torch.arange(start, min(m, start + 3))
        k = len(ids)
        delta = [torch.randn(k, 4, 3, generator=g) * 0.05, torch.randn(k, 3, generator=g) * 0.05]
        extras = {"c": [torch.randn(k, 5, generator=g) * 0.01]}
        out.append((ids, Upload(delta=delta, weight=torch.randint(10, 100, (k,), generator=g).float(), extras=extras)))
    return out


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_secure_mean_equals_mean_within_quantisation_error(dropout: float) -> None:
    m = 10
    # k = 6, t = 3: with the 4 of 10 that this seed drops, every client keeps 3 live
    # shareholders whatever graph the OS draws, so the round never aborts
    cfg = SecAggConfig(enabled=True, num_shares=6, dropout=dropout)
    secure, plain = SecureMeanAggregator(cfg, seed=0, round_=1), MeanAggregator(AggregatorConfig())
    for ids, up in _uploads(m):
        secure.add(ids, up)
        if dropout == 0:
            plain.add(ids, up)
    got = secure.reduce(Comm(), [], m, 100)
    contributors = secure.last.contributors
    if dropout:
        assert len(contributors) < m  # some dropped after sharing keys, still unmasked
        for ids, up in _uploads(m):
            keep = torch.tensor([int(i) in contributors for i in ids])
            plain.add(ids[keep], Upload([d[keep] for d in up.delta], up.weight[keep], {k: [t[keep] for t in v] for k, v in up.extras.items()}))
    want = plain.reduce(Comm(), [], m, 100)
    bound = error_bound(len(contributors), 8.0, 2**22) * 2  # relative weights reach ~2
    for a, b in zip(got.delta + got.extras["c"], want.delta + want.extras["c"]):
        assert a.shape == b.shape and (a - b).abs().max().item() <= bound
    assert secure.bytes_up > 0


def test_protocol_params_for_small_cohorts() -> None:
    p = protocol_params(SecAggConfig(enabled=True), 10, 0)
    assert (p.neighbours, p.threshold) == (9, 4)
    p = protocol_params(SecAggConfig(enabled=True, num_shares=5), 11, 0)
    assert p.neighbours == 6  # odd degree on an odd cohort: rounded up


@pytest.mark.parametrize(("override", "key"), [("aggregator.name=median", "aggregator.name"),
                                                ("compression.name=qsgd", "compression.name"),
                                                ("secagg.quantization_range=1000000000", "secagg.quantization_range")])
def test_config_refuses_what_needs_individual_updates(override: str, key: str) -> None:
    with pytest.raises(FltoolError, match=key):
        load_config(None, ["secagg.enabled=true", override])


def _cfg(tmp_path: Path, secagg: bool, rounds: int = 3):
    return load_config(None, [
        "data.dataset=synthetic", "data.synthetic.train_size=400", "data.synthetic.test_size=100", "device=cpu",
        "model.name=mlp", "federated.num_clients=20", "federated.fraction=0.5", f"federated.rounds={rounds}",
        f"secagg.enabled={'true' if secagg else 'false'}", "secagg.dropout=0.2", "secagg.num_shares=4",
        f"output.run_dir={tmp_path}",
    ])


def test_training_with_secagg_matches_training_without(tmp_path: Path) -> None:
    on, off = _cfg(tmp_path / "on", True), _cfg(tmp_path / "off", False)
    off.secagg.dropout = 0.0
    on.secagg.dropout = 0.0
    for cfg in (on, off):
        train_federated(cfg, create_run_dir(cfg))
    a, b = read_metrics(tmp_path / "on"), read_metrics(tmp_path / "off")
    assert abs(a[-1]["test_accuracy"] - b[-1]["test_accuracy"]) <= 0.02
    ma, mb = load_checkpoint(last_checkpoint(tmp_path / "on")).model, load_checkpoint(last_checkpoint(tmp_path / "off")).model
    assert all((ma[k] - mb[k]).abs().max().item() < 1e-3 for k in ma)


def test_metrics_show_the_protocol(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, True, rounds=1)  # 10 clients, 20% drop after sharing keys
    train_federated(cfg, create_run_dir(cfg))
    row = read_metrics(tmp_path)[0]
    assert row["secagg_contributors"] + len(row["secagg_dropped_ids"]) == 10
    assert row["secagg_bytes_up_per_client"] > 4 * 199_210  # the masked 2NN vector, plus keys and shares
    assert 0 < row["secagg_bytes_down_per_client"] < 10_000 and row["secagg_server_s"] > 0
    assert row["bytes_up"] >= row["secagg_contributors"] * row["secagg_bytes_up_per_client"]


def test_resume_with_secagg_is_exact(tmp_path: Path) -> None:
    full = _cfg(tmp_path / "full", True)
    train_federated(full, create_run_dir(full))
    cfg = _cfg(tmp_path / "resumed", True)

    def interrupt(row: dict) -> None:
        if row["round"] == 2:
            raise KeyboardInterrupt

    run_dir = create_run_dir(cfg)
    with pytest.raises(KeyboardInterrupt):
        train_federated(cfg, run_dir, on_round=interrupt)
    train_federated(cfg, run_dir, resume=load_checkpoint(last_checkpoint(run_dir)))
    a, b = load_checkpoint(last_checkpoint(tmp_path / "full")).model, load_checkpoint(last_checkpoint(run_dir)).model
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_too_few_shareholders_skip_the_round(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = _cfg(tmp_path, True, rounds=1)
    cfg.secagg.dropout = 1.0  # everyone drops after sharing keys: nothing to unmask
    cfg.clients.on_too_few = "skip"
    with pytest.warns(UserWarning, match="skipped"):
        train_federated(cfg, create_run_dir(cfg))
    assert read_metrics(tmp_path)[0]["train_loss"] is None
    again = _cfg(tmp_path / "again", True, rounds=1)
    again.secagg.dropout = 1.0
    again.clients.on_too_few = "resample"  # every draw aborts: after MAX_ATTEMPTS draws the run fails
    monkeypatch.setattr(availability, "MAX_ATTEMPTS", 3)
    with pytest.raises(FltoolError, match="^round 1: secure aggregation aborted in all 3 draws"):
        train_federated(again, create_run_dir(again))


def test_resample_after_an_abort_draws_the_round_again(tmp_path: Path) -> None:
    """clients.on_too_few resample: an aborted round is drawn again (new cohort, its own
    protocol dropouts, drawn per (round, client)) until its sum can be unmasked; the run
    is reproducible and resumes bit for bit (the complete graph: aborts depend on the
    seeded dropouts alone)."""
    def cfg(name: str):
        c = _cfg(tmp_path / name, True, rounds=3)
        c.secagg.graph, c.secagg.dropout, c.secagg.min_inputs = "complete", 0.4, 7  # 7 of 10 must survive
        return c

    straight, rows, _ = train_maybe_interrupted(cfg("straight"))
    first = [plan_round(cfg("x"), [1] * 20, r, []).sampled for r in (1, 2, 3)]
    assert [r["client_ids"] for r in rows] != first  # some round was drawn again
    assert all(r["secagg_contributors"] >= 7 and r["train_loss"] is not None for r in rows)
    resumed, again, _ = train_maybe_interrupted(cfg("resumed"), interrupt_after=1)
    assert all(torch.equal(straight.model[k], resumed.model[k]) for k in straight.model)
    assert [r["client_ids"] for r in again] == [r["client_ids"] for r in rows]


@pytest.mark.parametrize("algorithm", ["scaffold", "fedprox", "fednova", "fedadam"])
def test_algorithms_whose_aggregate_is_a_sum_run_through_secagg(tmp_path: Path, algorithm: str) -> None:
    """SCAFFOLD's control variates and FedNova's step counts (extras) go through the
    protocol too: the run matches the plain one within the quantisation error."""
    models = []
    for on in (True, False):
        cfg = _cfg(tmp_path / f"{on}", on, rounds=2)
        if algorithm == "fedadam":  # FedAvg's clients, Adam on the server
            cfg.server_optimizer = load_config(None, ["server_optimizer.name=adam"]).server_optimizer
        else:
            cfg.algorithm = load_config(None, [f"algorithm.name={algorithm}"]).algorithm
        cfg.secagg.dropout = 0.0
        train_federated(cfg, create_run_dir(cfg))
        models.append(load_checkpoint(last_checkpoint(tmp_path / f"{on}")))
    a, b = models
    assert all((a.model[k] - b.model[k]).abs().max().item() < 1e-3 for k in a.model)


@pytest.mark.gpu
def test_masks_expand_on_cuda() -> None:
    """The masks go to the vectors' device chunk by chunk; the sum is still exact."""
    from fltool.algorithms.secagg import SecAggParams, run_round

    g = torch.Generator().manual_seed(0)
    v = {u: torch.randint(0, 2**22 + 1, (5000,), generator=g).cuda() for u in range(6)}
    r = run_round(v, SecAggParams(neighbours=4, threshold=3, chunk=1024), drop={"masked_input": {2}})
    assert r.total.is_cuda
    assert torch.equal(r.total.cpu(), sum(v[u].cpu() for u in r.contributors) % 2**32)


def test_central_dp_noises_the_unmasked_sum(tmp_path: Path) -> None:
    """Clients clip before masking; the server's Gaussian noise goes on after unmasking."""
    cfg = _cfg(tmp_path, True, rounds=1)
    cfg.dp = load_config(None, ["dp.mode=central", "dp.noise_multiplier=1.0", "dp.clip_norm=1.0"]).dp
    train_federated(cfg, create_run_dir(cfg))
    row = read_metrics(tmp_path)[0]
    assert row["epsilon"] > 0 and row["secagg_contributors"] > 0
