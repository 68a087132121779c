"""FedProx (Li et al. 2020, "Federated Optimization in Heterogeneous Networks").

Client k approximately minimises h_k(w; w^t) = F_k(w) + (mu/2) ||w - w^t||^2 (Eq. 2 /
Algorithm 2), here by the same E epochs of minibatch SGD as FedAvg, so each local step's
gradient is grad F_k(w) + mu (w - w^t). The server step is FedAvg's; mu = 0 is FedAvg.
"""

from __future__ import annotations

import pytest
import torch

from fltool.algorithms import ALGORITHMS
from fltool.algorithms.fedprox import FedProx, FedProxConfig, add_proximal_gradient_
from fltool.config.schema import FederatedConfig

SIZES = [3, 5, 8]


def proximal_term(params, anchor, mu):
    """(mu/2) ||w - w^t||^2 written out, for autograd."""
    return mu / 2 * sum(((p - a) ** 2).sum() for p, a in zip(params, anchor))


def test_the_config_carries_mu_and_mu_zero_adds_nothing():
    assert ALGORITHMS.get("fedprox") is FedProx and ALGORITHMS.config_class("fedprox") is FedProxConfig
    assert FedProx(FedProxConfig(name="fedprox", mu=0.3), FederatedConfig()).adjusts_gradients
    assert not FedProx(FedProxConfig(name="fedprox", mu=0.0), FederatedConfig()).adjusts_gradients


def test_the_added_gradient_is_the_autograd_gradient_of_the_proximal_term():
    """grad of (mu/2)||w - w^t||^2 is mu (w - w^t): per client of a stack of 5, and not
    on a client marked inactive (its schedule ended; the term alone would move it)."""
    g = torch.Generator().manual_seed(0)
    anchor = [torch.randn(3, 4, generator=g), torch.randn(3, generator=g)]
    stacked = [a + 0.1 * torch.randn(5, *a.shape, generator=g) for a in anchor]
    active = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0])
    mu = 0.7
    grads = [torch.zeros_like(p) for p in stacked]
    add_proximal_gradient_(grads, stacked, anchor, mu, active)
    algo = FedProx(FedProxConfig(name="fedprox", mu=mu), FederatedConfig())
    via_hook = [torch.ones_like(p) for p in stacked]
    algo.adjust_gradients_(via_hook, stacked, anchor, {}, active)
    for k in range(5):
        params = [p[k].clone().requires_grad_(True) for p in stacked]
        want = torch.autograd.grad(proximal_term(params, anchor, mu), params)
        for got, hooked, w in zip(grads, via_hook, want):
            torch.testing.assert_close(got[k], w * active[k])
            torch.testing.assert_close(hooked[k], 1 + w * active[k])


def test_local_steps_are_sgd_on_the_proximal_objective(fl, engine):
    """Each step uses grad F_k(w) + mu (w - w^t): a reference that differentiates
    h_k(w) = CE(w) + (mu/2)||w - w^t||^2 by autograd gives the same client models, and
    the round their n_k-weighted mean (B = 2, so clients stop at different steps)."""
    mu, lr = 0.9, 0.4
    cfg = fl.make_config(3, algorithm={"name": "fedprox", "mu": mu}, local_epochs=2, batch_size=2, lr=lr)
    model, clients = fl.linear_model(), fl.make_clients(SIZES)
    run = fl.run_rounds(cfg, model, clients, [[0, 1, 2]], engine)
    w0 = run.history[0]
    models = []
    for c in clients:
        w = [t.clone() for t in w0]
        for idx in fl.schedule(cfg, run.algorithm.rule, 1, c):
            leaves = [t.clone().requires_grad_(True) for t in w]
            h = torch.nn.functional.cross_entropy(fl.logits(leaves, c.x[idx]), c.y[idx]) + proximal_term(leaves, w0, mu)
            w = [t - lr * g for t, g in zip(w, torch.autograd.grad(h, leaves))]
        models.append(w)
    expected = [sum(c.n / 16 * m[i] for c, m in zip(clients, models)) for i in range(2)]
    fl.assert_params_close(run.final, expected)


def test_two_full_batch_steps_by_hand(fl):
    """E = 2 full-batch steps from w^t: step 1 has w = w^t, so no proximal pull,
    w1 = w^t - eta g(w^t); step 2 gains it: w2 = w1 - eta (g(w1) + mu (w1 - w^t))."""
    mu, lr = 2.0, 0.5
    cfg = fl.make_config(1, algorithm={"name": "fedprox", "mu": mu}, local_epochs=2, lr=lr)
    model, clients = fl.linear_model(), fl.make_clients([6])
    run = fl.run_rounds(cfg, model, clients, [[0]])
    w0, c = run.history[0], clients[0]
    w1 = [a - lr * g for a, g in zip(w0, fl.ce_gradient(w0, c.x, c.y))]
    w2 = [a - lr * (g + mu * (a - b)) for a, g, b in zip(w1, fl.ce_gradient(w1, c.x, c.y), w0)]
    fl.assert_params_close(run.final, w2)
    plain = [a - lr * g for a, g in zip(w1, fl.ce_gradient(w1, c.x, c.y))]
    assert not torch.allclose(run.final[0], plain[0], atol=1e-4)  # the pull is there


@pytest.mark.parametrize("batch_size", [None, 2])
def test_mu_zero_is_fedavg_exactly(fl, engine, batch_size):
    """mu = 0: h_k = F_k, bit for bit the same rounds as FedAvg."""
    runs = []
    for algorithm in ({"name": "fedavg"}, {"name": "fedprox", "mu": 0.0}):
        cfg = fl.make_config(3, algorithm=algorithm, local_epochs=2, batch_size=batch_size)
        runs.append(fl.run_rounds(cfg, fl.linear_model(), fl.make_clients(SIZES), [[0, 1, 2], [0, 2]], engine))
    for a, b in zip(runs[0].history, runs[1].history):
        assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_a_larger_mu_keeps_clients_closer_to_the_global_model(fl):
    """The proximal term bounds drift: ||w_k - w^t|| shrinks as mu grows."""
    drift = []
    for mu in (0.0, 1.0, 10.0):
        cfg = fl.make_config(1, algorithm={"name": "fedprox", "mu": mu}, local_epochs=5, lr=0.05)
        run = fl.run_rounds(cfg, fl.linear_model(), fl.make_clients([8]), [[0]])
        drift.append(sum(((a - b) ** 2).sum() for a, b in zip(run.final, run.history[0])).sqrt().item())
    assert drift[0] > drift[1] > drift[2] > 0
