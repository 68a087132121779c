"""FedNova (Wang et al. 2020, "Tackling the Objective Inconsistency Problem in
Heterogeneous Federated Optimization", Eq. 6-7 with plain local SGD, a_k = 1 per step).

Client k takes tau_k local steps and sends its normalised update d_k = (w_k - x)/tau_k;
with p_k = n_k / n the server computes
    tau_eff = sum_k p_k tau_k,     x+ = x + tau_eff * sum_k p_k d_k.
With equal tau_k this is FedAvg's x + sum_k p_k (w_k - x).
"""

from __future__ import annotations

import torch

from fltool.algorithms import ALGORITHMS, Aggregate, ClientInfo
from fltool.algorithms.api import LocalRule
from fltool.config.schema import AlgorithmConfig, FederatedConfig

SIZES = [3, 5, 8, 2]  # B = 2: tau_k = E * ceil(n_k / 2) = 2, 3, 4, 1 for E = 1


def test_unequal_local_steps_follow_eq_7_by_hand(fl, engine):
    """tau_k from unequal n_k at fixed B, E = 2 (tau = 4, 6, 8, 2), two rounds."""
    cfg = fl.make_config(len(SIZES), algorithm={"name": "fednova"}, local_epochs=2, batch_size=2, lr=0.2)
    clients = fl.make_clients(SIZES)
    cohorts = [[0, 1, 2, 3], [0, 2, 3]]
    run = fl.run_rounds(cfg, fl.linear_model(), clients, cohorts, engine)
    rule = LocalRule(2, 2, 0.2)
    x = run.history[0]
    for r, cohort in enumerate(cohorts, start=1):
        n = sum(clients[k].n for k in cohort)
        p = {k: clients[k].n / n for k in cohort}
        tau, d = {}, {}
        for k in cohort:
            batches = fl.schedule(cfg, rule, r, clients[k])
            tau[k] = len(batches)
            w_k = fl.local_sgd(x, clients[k], batches, rule.lr)
            d[k] = [(a - b) / tau[k] for a, b in zip(w_k, x)]
        assert [tau[k] for k in cohort] == [2 * -(-clients[k].n // 2) for k in cohort]
        tau_eff = sum(p[k] * tau[k] for k in cohort)
        x = [xi + tau_eff * sum(p[k] * d[k][i] for k in cohort) for i, xi in enumerate(x)]
        fl.assert_params_close(run.history[r], x)
    # and it is not FedAvg here: unequal tau_k re-weight the clients
    avg = fl.run_rounds(fl.make_config(len(SIZES), local_epochs=2, batch_size=2, lr=0.2), fl.linear_model(), clients, cohorts[:1])
    assert not torch.allclose(avg.final[0], run.history[1][0], atol=1e-4)


def test_equal_local_steps_are_fedavg(fl, engine):
    """Full-batch steps give tau_k = E for every client, however unequal n_k: then
    tau_eff sum_k p_k d_k = sum_k p_k (w_k - x), FedAvg (up to float rounding)."""
    clients = fl.make_clients([2, 7, 11])
    runs = [
        fl.run_rounds(fl.make_config(3, algorithm={"name": name}, local_epochs=3, lr=0.4), fl.linear_model(), clients, [[0, 1, 2], [0, 2]], engine)
        for name in ("fednova", "fedavg")
    ]
    for a, b in zip(runs[0].history[1:], runs[1].history[1:]):
        fl.assert_params_close(a, b)


def test_upload_and_server_update_by_hand():
    """d_k = (w_k - x)/tau_k with weight n_k and extra tau_k; the server's step is
    tau_eff * (the weighted mean of d_k), handed to the server optimizer as -step."""
    algo = ALGORITHMS.get("fednova")(AlgorithmConfig(name="fednova"), FederatedConfig())
    x = [torch.tensor([0.0, 1.0])]
    w = [torch.tensor([[2.0, 1.0], [0.0, 4.0]])]
    info = ClientInfo(ids=torch.tensor([0, 1]), n=torch.tensor([1.0, 3.0]), steps=torch.tensor([2.0, 6.0]))
    up = algo.client_upload(x, w, {}, info)
    torch.testing.assert_close(up.delta[0], torch.tensor([[1.0, 0.0], [0.0, 0.5]]))
    assert torch.equal(up.weight, info.n) and torch.equal(up.extras["tau"][0], info.steps)
    # weighted means as the aggregator forms them: p = (1/4, 3/4)
    mean_d = torch.tensor([0.25, 0.375])
    tau_eff = torch.tensor(0.25 * 2 + 0.75 * 6)  # 5
    seen = {}

    class Recorder:
        def apply(self, params, g):
            seen["g"] = g
            return [a - b for a, b in zip(params, g)]

    agg = Aggregate(delta=[mean_d], extras={"tau": [tau_eff]}, clients=2, num_clients=2)
    new, _ = algo.server_update(x, agg, {}, Recorder())
    torch.testing.assert_close(seen["g"][0], -5 * mean_d)
    torch.testing.assert_close(new[0], torch.tensor([1.25, 2.875]))
