"""Local training (`fltool.algorithms.local`): ClientUpdate of McMahan et al. 2017,
Algorithm 1 (E epochs of minibatch SGD over B-sized batches of a fresh permutation), with
each step's gradient handed to the algorithm's `adjust_gradients_` (FedProx's
mu (w - w^t), Li et al. 2020 Eq. 2; SCAFFOLD's - c_i + c, Karimireddy et al. 2020 Alg. 1
line 10)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fltool.algorithms import ALGORITHMS, LocalRule
from fltool.algorithms.fedavg import FedAvg
from fltool.algorithms.fedprox import FedProx, FedProxConfig
from fltool.algorithms.local import (
    batch_schedule,
    client_update,
    epoch_orders,
    full_gradient,
    masked_cross_entropy,
    steps_per_epoch,
)
from fltool.algorithms.scaffold import Scaffold, ScaffoldConfig
from fltool.config.schema import AlgorithmConfig, FederatedConfig
from fltool.engines.base import make_apply_fn


def tiny_linear_problem():
    """A seeded 6->2 linear classifier, its apply_fn, initial weights, and 9 examples."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(6, 2))
    w0 = [p.detach().clone() for p in model.parameters()]
    return model, make_apply_fn(model), w0, torch.randn(9, 1, 2, 3), torch.randint(2, (9,))


def test_algorithms_share_fedavgs_local_rule_except_fedsgd():
    """E, B, eta come from `federated`; FedSGD alone is one full-batch step (E=1, B=inf)."""
    fed = FederatedConfig(local_epochs=5, batch_size=10, lr=0.2)
    for name in ALGORITHMS.names():
        algo = ALGORITHMS.get(name)(ALGORITHMS.config_class(name)(name=name), fed)
        want = LocalRule(1, None, 0.2) if name == "fedsgd" else LocalRule(5, 10, 0.2)
        assert algo.rule == want, name
    assert {"fedavg", "fedsgd", "fedprox", "scaffold", "fednova"} <= set(ALGORITHMS.names())


def test_batch_schedule_is_e_epochs_of_permutations():
    """u_k = E * ceil(n_k / B) steps; each epoch visits every example once."""
    batches = batch_schedule(25, LocalRule(3, 10, 0.1), torch.Generator().manual_seed(0))
    assert [b.numel() for b in batches] == [10, 10, 5] * 3
    for e in range(3):
        assert torch.equal(torch.sort(torch.cat(batches[3 * e : 3 * e + 3])).values, torch.arange(25))
    orders = [torch.cat(batches[3 * e : 3 * e + 3]) for e in range(3)]
    assert not torch.equal(orders[0], orders[1])  # a fresh permutation per epoch
    assert [b.numel() for b in batch_schedule(25, LocalRule(2, None, 0.1), torch.Generator())] == [25, 25]
    assert steps_per_epoch(25, 10) == 3 and steps_per_epoch(25, None) == 1 and steps_per_epoch(10, 10) == 1


def test_full_batch_orders_draw_nothing():
    g = torch.Generator().manual_seed(0)
    state = g.get_state()
    assert torch.equal(epoch_orders(4, LocalRule(2, None, 0.1), g), torch.arange(4).expand(2, 4))
    assert torch.equal(g.get_state(), state)
    same = [batch_schedule(12, LocalRule(2, 5, 0.1), torch.Generator().manual_seed(3)) for _ in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(*same))


def test_masked_cross_entropy_reduces_each_client_over_its_real_examples():
    g = torch.Generator().manual_seed(0)
    logits, y = torch.randn(2, 4, 3, generator=g), torch.randint(3, (2, 4), generator=g)
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    ce = masked_cross_entropy(logits, y, mask)
    torch.testing.assert_close(ce[0], F.cross_entropy(logits[0, :3], y[0, :3]))
    assert ce[1] == 0  # a client with no real example left
    torch.testing.assert_close(masked_cross_entropy(logits, y), torch.stack([F.cross_entropy(z, t) for z, t in zip(logits, y)]))
    torch.testing.assert_close(masked_cross_entropy(logits[0], y[0]), F.cross_entropy(logits[0], y[0]))


def test_full_gradient_is_the_gradient_of_the_mean_loss_over_all_data():
    """SCAFFOLD option I's g_i(x): every example of the client, at x."""
    model, apply_fn, w0, x, y = tiny_linear_problem()
    got = full_gradient(apply_fn, w0, x, y)
    F.cross_entropy(model(x), y).backward()
    for g, p in zip(got, model.parameters()):
        torch.testing.assert_close(g, p.grad)
    assert all(not t.requires_grad for t in got)


def sgd_reference(model, x, y, batches, lr):
    ref = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(6, 2))
    ref.load_state_dict(model.state_dict())
    opt = torch.optim.SGD(ref.parameters(), lr=lr)
    total = 0.0
    for idx in batches:
        opt.zero_grad()
        loss = F.cross_entropy(ref(x[idx]), y[idx])
        loss.backward()
        opt.step()
        total += loss.item()
    return [p.detach() for p in ref.parameters()], total


def test_client_update_is_plain_sgd_on_the_schedule():
    """FedAvg's ClientUpdate is torch.optim.SGD over the batches, from w without changing it."""
    model, apply_fn, w0, x, y = tiny_linear_problem()
    algo = FedAvg(AlgorithmConfig(), FederatedConfig(local_epochs=2, batch_size=4, lr=0.5))
    batches = batch_schedule(9, algo.rule, torch.Generator().manual_seed(1))
    new, loss_sum = client_update(apply_fn, w0, x, y, algo, batches, {})
    want, total = sgd_reference(model, x, y, batches, 0.5)
    for a, b in zip(new, want):
        torch.testing.assert_close(a, b)
    assert loss_sum.item() == pytest.approx(total, abs=1e-5)  # the sum of the minibatch losses
    assert all(torch.equal(a, b) for a, b in zip(w0, [p.detach() for p in model.parameters()]))


def test_client_update_with_fedprox_is_sgd_on_the_proximal_objective():
    """Li et al. 2020 Eq. 2: minimise h(w) = F(w) + (mu/2)||w - w^t||^2; autograd through
    the written-out objective gives the same iterates, and they differ from plain SGD."""
    _, apply_fn, w0, x, y = tiny_linear_problem()
    fed = FederatedConfig(local_epochs=3, batch_size=4, lr=0.5)
    algo = FedProx(FedProxConfig(name="fedprox", mu=0.8), fed)
    batches = batch_schedule(9, algo.rule, torch.Generator().manual_seed(1))
    new, _ = client_update(apply_fn, w0, x, y, algo, batches, {})
    params = [w.clone().requires_grad_(True) for w in w0]
    for idx in batches:
        prox = 0.8 / 2 * sum(((p - a) ** 2).sum() for p, a in zip(params, w0))
        loss = F.cross_entropy(apply_fn(params, x[idx]), y[idx]) + prox
        grads = torch.autograd.grad(loss, params)
        with torch.no_grad():
            for p, g in zip(params, grads):
                p -= 0.5 * g
    for a, b in zip(new, params):
        torch.testing.assert_close(a, b.detach())
    plain, _ = client_update(apply_fn, w0, x, y, FedAvg(AlgorithmConfig(), fed), batches, {})
    assert any(not torch.allclose(a, b) for a, b in zip(new, plain))


def test_client_update_with_scaffold_steps_along_g_minus_c_i_plus_c():
    """Karimireddy et al. 2020 Algorithm 1 line 10: y <- y - eta_l (g(y) - c_i + c)."""
    model, apply_fn, w0, x, y = tiny_linear_problem()
    algo = Scaffold(ScaffoldConfig(name="scaffold"), FederatedConfig(local_epochs=2, batch_size=4, lr=0.5))
    g = torch.Generator().manual_seed(5)
    c = [torch.randn(p.shape, generator=g) for p in w0]
    c_i = [torch.randn(1, *p.shape, generator=g) for p in w0]
    context = algo.client_context({"c": c}, {"c": c_i}, w0)
    batches = batch_schedule(9, algo.rule, torch.Generator().manual_seed(1))
    new, _ = client_update(apply_fn, w0, x, y, algo, batches, context)
    w = [t.clone() for t in w0]
    for idx in batches:
        leaves = [t.clone().requires_grad_(True) for t in w]
        grads = torch.autograd.grad(F.cross_entropy(apply_fn(leaves, x[idx]), y[idx]), leaves)
        w = [t - 0.5 * (gr - ci[0] + cc) for t, gr, ci, cc in zip(w, grads, c_i, c)]
    for a, b in zip(new, w):
        torch.testing.assert_close(a, b)
