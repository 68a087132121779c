"""Distributed DP under secagg (`dp.noise_placement: clients`): each client adds
N(0, (z S)^2 / t) before quantising and masking, t the round's reconstruction threshold,
so the unmasked sum of any t or more inputs carries noise of std >= z S. Measured here
on zero updates, where the sum is pure noise; then whole runs: the engines agree, a
resume is bitwise, and the accountant spends what central DP with the same z spends."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch

from fltool.algorithms.api import Upload
from fltool.algorithms.privacy import Privacy
from fltool.algorithms.secagg import SecAggParams, dequantize, quantize, run_round
from fltool.algorithms.secagg.aggregator import SecureMeanAggregator, fewest_inputs, protocol_params
from fltool.config import config_from_dict, load_config
from fltool.config.schema import DPConfig, SecAggConfig
from fltool.distributed.comm import Comm
from fltool.errors import FltoolError
from fltool.trainers.privacy_budget import budget_for
from tests.conftest import train_maybe_interrupted

Z, S, T, M, D = 1.0, 0.5, 4, 10, 20_000  # per-client std z S / sqrt(t) = 0.25


def distributed(seed: int = 3, expected: float = M) -> Privacy:
    dp = DPConfig(mode="central", clip_norm=S, noise_multiplier=Z, noise_placement="clients")
    return Privacy(dp, Z, expected, seed=seed, device=torch.device("cpu"))


def zero_uploads(privacy: Privacy, round_: int, shares: int = T) -> tuple[torch.Tensor, Upload]:
    ids = torch.arange(M)
    zeros = Upload(delta=[torch.zeros(M, D // 4, 2), torch.zeros(M, D // 2)], weight=torch.arange(1.0, M + 1))
    return ids, privacy.client_side(ids, zeros, round_, shares)


def flat(upload: Upload) -> torch.Tensor:
    return torch.cat([d.reshape(M, -1) for d in upload.delta], dim=1)


def test_each_client_adds_its_share_seeded_by_seed_round_client() -> None:
    privacy = distributed()
    ids, noised = zero_uploads(privacy, 1)
    per_client = flat(noised).std(dim=1)
    # 20,000 draws a client: the std's own error is 1/sqrt(2 * 20000) = 0.5%
    assert per_client.tolist() == pytest.approx([Z * S / math.sqrt(T)] * M, rel=0.02)
    assert torch.equal(noised.weight, torch.ones(M))  # central DP's weighting: each clipped update counts 1
    alone = privacy.client_side(torch.tensor([7]), Upload(delta=[torch.zeros(1, D // 4, 2), torch.zeros(1, D // 2)], weight=torch.ones(1)), 1, T)
    assert torch.equal(alone.delta[1][0], noised.delta[1][7])  # client 7's noise whatever its chunk: engines agree
    assert not torch.equal(zero_uploads(privacy, 2)[1].delta[1], noised.delta[1])  # fresh each round
    local = Privacy(DPConfig(mode="local", clip_norm=S, noise_multiplier=Z), Z, M, seed=3, device=torch.device("cpu"))
    local_noise = local.client_side(ids, Upload(delta=[torch.zeros(M, D // 4, 2), torch.zeros(M, D // 2)], weight=torch.ones(M)), 1)
    assert not torch.allclose(local_noise.delta[1] / math.sqrt(T), noised.delta[1])  # a stream of its own, not local DP's
    with pytest.raises(FltoolError, match="threshold"):
        privacy.client_side(ids, noised, 1)


def unmasked_sum(upload: Upload, dropped: set[int], seed: int = 0, params: SecAggParams | None = None) -> torch.Tensor:
    """The noised updates through quantisation, SecAgg (t = T, complete graph) and
    unmasking, `dropped` vanishing after sharing keys: the float sum over the rest."""
    coins = torch.Generator().manual_seed(seed)
    cfg = SecAggConfig(enabled=True)
    vectors = {u: quantize(row.double(), cfg.clipping_range, cfg.quantization_range, coins) for u, row in enumerate(flat(upload))}
    params = params or SecAggParams(neighbours=M - 1, threshold=T)
    result = run_round(vectors, params, drop={"masked_input": dropped}, keep_vectors=False)
    return dequantize(result.total, len(result.contributors), cfg.clipping_range, cfg.quantization_range)


def test_the_unmasked_sum_of_t_survivors_has_std_z_s_and_of_more_survivors_more() -> None:
    """The conservative sizing: at the fewest inputs the protocol unmasks (t), the sum's
    noise is the central mechanism's, N(0, (z S)^2); every survivor beyond adds a share."""
    privacy = distributed()
    _, noised = zero_uploads(privacy, 1)
    fewest = unmasked_sum(noised, dropped=set(range(T, M)))  # 6 of 10 drop: exactly t = 4 inputs
    assert abs(fewest.mean().item()) < 0.02  # sd of the mean: 0.5 / sqrt(20000) = 0.0035
    assert fewest.std().item() == pytest.approx(Z * S, rel=0.02)  # 0.5
    everyone = unmasked_sum(noised, dropped=set())
    assert everyone.std().item() == pytest.approx(Z * S * math.sqrt(M / T), rel=0.02)  # 0.79: 2.5x the variance
    with pytest.raises(FltoolError, match="aborted"):  # t - 1 inputs: never unmasked, so never under-noised
        unmasked_sum(noised, dropped=set(range(T - 1, M)))


def test_min_inputs_raises_the_floor_and_shrinks_each_share() -> None:
    """secagg.min_inputs = 8 over a threshold of 3: sums of fewer than 8 inputs are never
    unmasked, so each client adds N(0, (z S)^2 / 8) and 8 survivors carry exactly z S."""
    cfg = SecAggConfig(enabled=True, graph="complete", reconstruction_threshold=3, min_inputs=8)
    params = protocol_params(cfg, M, 1)
    assert (params.threshold, params.fewest_inputs) == (3, 8)
    assert fewest_inputs(cfg, range(2, 30)) == 8 and fewest_inputs(SecAggConfig(enabled=True), range(10, 11)) == 4
    _, noised = zero_uploads(distributed(), 1, shares=params.fewest_inputs)
    eight = unmasked_sum(noised, dropped={0, 1}, params=params)
    assert eight.std().item() == pytest.approx(Z * S, rel=0.02)
    with pytest.raises(FltoolError, match="7 inputs < the fewest allowed, 8"):
        unmasked_sum(noised, dropped={0, 1, 2}, params=params)  # 7 of 10: above t, below the floor
    with pytest.raises(FltoolError, match="cannot reach secagg.min_inputs 8"):
        protocol_params(cfg, 7, 1)  # a cohort that could never be unmasked aborts before training


def test_the_release_through_the_secure_mean_is_the_noised_sum_over_e_m() -> None:
    """Aggregator and server side together: (sum_{U3} clip(x_k) + noise) / E[m], the
    noise the clients' (the server adds none), its std z S sqrt(|U3| / t)."""
    privacy = distributed(expected=8.0)
    draws = []
    for round_ in (1, 2):
        agg = SecureMeanAggregator(SecAggConfig(enabled=True, graph="complete", reconstruction_threshold=T, dropout=0.3), 0, round_)
        agg.add(*zero_uploads(privacy, round_))
        aggregate = agg.reduce(Comm(), [], M, 100)
        u3 = len(agg.last.contributors)
        assert aggregate.clients == u3 and T <= u3 < M  # 30% dropped after sharing keys
        assert agg.metrics()["secagg_clipped"] == 0  # the range holds the noise (checked at load)
        released = privacy.server_side(aggregate, round_, Comm())
        draws.append(torch.cat([d.flatten() for d in released.delta]) * 8.0 / math.sqrt(u3 / T))
    assert torch.cat(draws).std().item() == pytest.approx(Z * S, rel=0.02)


def test_central_dp_with_secagg_dropouts_releases_the_sum_of_the_survivors() -> None:
    """The server-noise path: a fixed denominator over the survivors' sum, not the
    survivors' mean scaled up to the cohort (which would stretch one client's weight)."""
    privacy = Privacy(DPConfig(mode="central", clip_norm=10.0, noise_multiplier=0.0), 0.0, 8.0, seed=0, device=torch.device("cpu"))
    x = torch.linspace(-1, 1, M * 6).view(M, 6)
    agg = SecureMeanAggregator(SecAggConfig(enabled=True, graph="complete", reconstruction_threshold=T, dropout=0.3), 0, 1)
    agg.add(torch.arange(M), privacy.client_side(torch.arange(M), Upload(delta=[x], weight=torch.ones(M)), 1))
    out = privacy.server_side(agg.reduce(Comm(), [], M, 100), 1, Comm())
    survivors = agg.last.contributors
    assert len(survivors) < M
    torch.testing.assert_close(out.delta[0], x[survivors].sum(0) / 8.0, atol=M * 16 / 2**22, rtol=0)


BASE = ["secagg.enabled=true", "dp.mode=central", "dp.noise_placement=clients", "dp.noise_multiplier=1.0"]


@pytest.mark.parametrize(("overrides", "line"), [
    (["secagg.enabled=false"], "dp.noise_placement: clients needs secagg.enabled"),
    (["dp.mode=local"], "dp.noise_placement: clients splits central DP's noise among the clients; it needs dp.mode central"),
    (["dp.adaptive_clipping=true", "dp.count_noise=5", "federated.sampling=poisson"], "dp.adaptive_clipping: the count of unclipped clients"),
    (["secagg.clipping_range=4", "secagg.reconstruction_threshold=2"], "secagg.clipping_range: 4 would cut the clients' DP noise"),
    (["secagg.min_inputs=11"], "secagg.min_inputs: 11 is more than the 10 clients a round samples"),
])
def test_config_refuses_distributed_noise_that_protects_nothing(overrides: list[str], line: str) -> None:
    with pytest.raises(FltoolError) as info:
        load_config(None, [*BASE, *overrides])
    assert len(info.value.lines) == 1 and line in info.value.lines[0]


def test_a_calibrated_z_that_the_range_would_cut_is_refused_before_training() -> None:
    """S + 6 z S / sqrt(t) > c: the range check runs once calibration gives z."""
    cfg = load_config(None, ["secagg.enabled=true", "dp.mode=central", "dp.noise_placement=clients", "dp.target_epsilon=0.5",
                             "secagg.clipping_range=2", "secagg.reconstruction_threshold=2", "federated.rounds=5"])
    with pytest.raises(FltoolError, match=r"^secagg.clipping_range: 2 would cut the clients' DP noise"):
        budget_for(cfg)


ROUNDS = 3


def make_config(root: Path, engine: str, placement: str = "clients", **secagg: Any):
    raw = {
        "seed": 2,
        "device": "cpu",
        "data": {"dataset": "synthetic", "synthetic": {"train_size": 400, "test_size": 40, "shape": [1, 8, 8]}},
        "model": {"name": "mlp"},
        "federated": {"num_clients": 20, "fraction": 0.5, "rounds": ROUNDS, "local_epochs": 1, "batch_size": 8, "lr": 0.1,
                      "engine": engine},
        "dp": {"mode": "central", "clip_norm": 0.5, "noise_multiplier": 0.8, "noise_placement": placement},
        # k = 4, t = 3: this seed drops at most 2 of a round's 10 clients, which leaves every
        # client 3 live shareholders whatever graph the OS draws: no round aborts, runs repeat
        "secagg": {"enabled": True, "num_shares": 4, "reconstruction_threshold": 3, "dropout": 0.2, **secagg},
        "eval": {"every": ROUNDS},
        "output": {"dir": str(root), "checkpoint_every": 1},
    }
    return config_from_dict(raw, "secagg_dp")


@pytest.mark.usefixtures("one_thread")
def test_runs_engines_agree_resume_is_bitwise_and_epsilon_is_centrals(tmp_path: Path) -> None:
    seq, seq_rows, _ = train_maybe_interrupted(make_config(tmp_path / "seq", "sequential"))
    vec, vec_rows, _ = train_maybe_interrupted(make_config(tmp_path / "vec", "vectorized"))
    for k in seq.model:  # the same noise (per-client seeds), the same coins; float sums differ in the last bits
        torch.testing.assert_close(vec.model[k], seq.model[k], rtol=1e-4, atol=1e-5)
    resumed, rows, _ = train_maybe_interrupted(make_config(tmp_path / "resumed", "vectorized"), interrupt_after=1)
    for k in vec.model:
        assert torch.equal(resumed.model[k], vec.model[k]), k
    untimed = lambda rs: [{k: v for k, v in r.items() if k not in ("wall_s", "elapsed_s") and not k.endswith("_s")} for r in rs]  # noqa: E731
    assert untimed(rows) == untimed(vec_rows)
    central = budget_for(make_config(tmp_path, "vectorized", placement="server"))
    assert [r["epsilon"] for r in rows] == [central.epsilon(r) for r in range(1, ROUNDS + 1)]  # guaranteed noise: z S
    for r in rows:  # 10 clients, t = 3: the sum's std is z S sqrt(|U3| / 3), never below z S
        assert r["dp_sum_noise_std"] == pytest.approx(0.8 * 0.5 * math.sqrt(r["secagg_contributors"] / 3))
        assert r["dp_sum_noise_std"] >= 0.8 * 0.5 and r["secagg_clipped"] == 0
    noiseless = train_maybe_interrupted(make_config(tmp_path / "server", "vectorized", placement="server"))[0]
    assert any(not torch.equal(noiseless.model[k], vec.model[k]) for k in vec.model)  # a different noise draw
