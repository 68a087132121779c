"""FedAvg (McMahan et al. 2017, Algorithm 1) on a hand-checkable problem.

Algorithm 1, ServerUpdate: w_{t+1} <- sum_{k in S_t} (n_k / m_t) w^k_{t+1}, with
m_t = sum_{k in S_t} n_k and w^k_{t+1} the result of ClientUpdate: E epochs of
minibatch SGD (batch B, step eta) from w_t on client k's data.
"""

from __future__ import annotations

import torch

from fltool.algorithms import ALGORITHMS, Aggregate, ClientInfo, FedAvg
from fltool.algorithms.api import LocalRule
from fltool.config.schema import AlgorithmConfig, FederatedConfig

SIZES = [3, 5, 8, 2]  # unequal n_k: the weights n_k/n matter


def reference_round(fl, cfg, rule, r, w, clients, cohort):
    """Algorithm 1's round written out: local SGD per client, then the n_k/n mean."""
    models = [fl.local_sgd(w, clients[k], fl.schedule(cfg, rule, r, clients[k]), rule.lr) for k in cohort]
    n = sum(clients[k].n for k in cohort)
    return [sum(clients[k].n / n * m[i] for k, m in zip(cohort, models)) for i in range(len(w))]


def test_a_round_is_the_n_weighted_mean_of_the_client_models(fl, engine):
    """w_{t+1} = sum_k n_k/n w^k_{t+1} (Algorithm 1), with E = 2 epochs of B = 2
    minibatches (partial last batches), over two rounds of different cohorts."""
    cfg = fl.make_config(len(SIZES), local_epochs=2, batch_size=2, lr=0.2)
    model, clients = fl.linear_model(), fl.make_clients(SIZES)
    cohorts = [[0, 1, 2], [1, 3]]
    run = fl.run_rounds(cfg, model, clients, cohorts, engine)
    rule = LocalRule(2, 2, 0.2)
    w = run.history[0]
    for r, cohort in enumerate(cohorts, start=1):
        w = reference_round(fl, cfg, rule, r, w, clients, cohort)
        fl.assert_params_close(run.history[r], w)
    # not the unweighted mean: the n_k/n weights are what the test pins down
    models = [fl.local_sgd(run.history[0], clients[k], fl.schedule(cfg, rule, 1, clients[k]), 0.2) for k in cohorts[0]]
    unweighted = [sum(m[i] for m in models) / 3 for i in range(2)]
    assert not torch.allclose(run.history[1][0], unweighted[0], atol=1e-4)


def test_full_batch_round_by_hand_on_one_step(fl, engine):
    """E = 1, B = inf: w^k = w - eta g_k(w), so w_{t+1} = w - eta sum_k n_k/n g_k(w)."""
    cfg = fl.make_config(3, lr=0.5)
    model, clients = fl.linear_model(), fl.make_clients([2, 4, 6])
    run = fl.run_rounds(cfg, model, clients, [[0, 1, 2]], engine)
    w = run.history[0]
    grads = [fl.ce_gradient(w, c.x, c.y) for c in clients]
    expected = [w[i] - 0.5 * sum(c.n / 12 * g[i] for c, g in zip(clients, grads)) for i in range(2)]
    fl.assert_params_close(run.final, expected)


def test_client_upload_is_the_update_weighted_by_examples():
    """The upload is Delta_k = w_k - w with weight n_k; no extras, no state."""
    fed = FederatedConfig(local_epochs=3, batch_size=7, lr=0.05)
    algo = ALGORITHMS.get("fedavg")(AlgorithmConfig(), fed)
    assert algo.rule == LocalRule(3, 7, 0.05)
    w = [torch.tensor([1.0, 2.0]), torch.tensor([[3.0]])]
    w_k = [torch.tensor([[1.5, 1.0], [0.0, 2.0]]), torch.tensor([[[4.0]], [[2.5]]])]  # 2 clients stacked
    info = ClientInfo(ids=torch.tensor([4, 9]), n=torch.tensor([10.0, 30.0]), steps=torch.tensor([2.0, 5.0]))
    up = algo.client_upload(w, w_k, {}, info)
    torch.testing.assert_close(up.delta[0], torch.tensor([[0.5, -1.0], [-1.0, 0.0]]))
    torch.testing.assert_close(up.delta[1], torch.tensor([[[1.0]], [[-0.5]]]))
    assert torch.equal(up.weight, info.n) and up.extras == {} and up.state == {}
    assert algo.init_server_state(w) == {} and algo.init_client_state(w) == {}
    assert not algo.adjusts_gradients and not algo.needs_global_gradient


def test_server_update_hands_minus_the_mean_update_to_the_server_optimizer():
    """The pseudo-gradient of Reddi et al. 2021 is g = -Delta; sgd at lr 1 then gives
    FedAvg's w + Delta (McMahan et al.)."""
    seen = {}

    class Recorder:
        def apply(self, params, pseudo_grad):
            seen["g"] = [g.clone() for g in pseudo_grad]
            return [p - g for p, g in zip(params, pseudo_grad)]

    algo = FedAvg(AlgorithmConfig(), FederatedConfig())
    w = [torch.tensor([1.0, -1.0])]
    agg = Aggregate(delta=[torch.tensor([0.25, 0.5])], extras={}, clients=2, num_clients=5)
    new, server = algo.server_update(w, agg, {}, Recorder())
    torch.testing.assert_close(seen["g"][0], torch.tensor([-0.25, -0.5]))
    torch.testing.assert_close(new[0], torch.tensor([1.25, -0.5]))
    assert server == {}


def test_the_global_model_is_not_mutated_by_a_round(fl, engine):
    """Every client starts from the same w_t: training one must not move another's start."""
    cfg = fl.make_config(3, local_epochs=2, batch_size=2)
    model, clients = fl.linear_model(), fl.make_clients([3, 4, 5])
    before = [p.detach().clone() for p in model.parameters()]
    run = fl.run_rounds(cfg, model, clients, [[0, 1, 2]], engine)
    assert all(torch.equal(a, b) for a, b in zip(before, run.history[0]))
    assert all(torch.equal(a, b.detach()) for a, b in zip(before, model.parameters()))
    assert not torch.equal(run.final[0], before[0])
