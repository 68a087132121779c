from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
import torch.nn.functional as F

from fltool.algorithms import LocalRule, batch_schedule, client_update, rule_for
from fltool.algorithms.local import add_proximal_gradient_, local_objective, masked_cross_entropy, proximal_term
from fltool.config.schema import FederatedConfig
from fltool.run.checkpoint import load_checkpoint
from fltool.engines.sequential import make_apply_fn
from fltool.trainers.federated import build_clients, train_federated
from fltool.run.rundir import create_run_dir, last_checkpoint
from fltool.models.setup import seeded_model
from fltool.data import load_dataset


def tiny_linear_problem():
    """A seeded 6->2 linear classifier, its apply_fn, initial weights, and 9 examples."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(6, 2))
    w0 = [p.detach().clone() for p in model.parameters()]
    return model, make_apply_fn(model), w0, torch.randn(9, 1, 2, 3), torch.randint(2, (9,))


def test_modes_differ_only_in_the_local_rule():
    fed = FederatedConfig(local_epochs=5, batch_size=10, lr=0.2, mu=0.5)
    assert rule_for("fedavg", fed) == LocalRule(5, 10, 0.2, 0.0)
    assert rule_for("fedprox", fed) == LocalRule(5, 10, 0.2, 0.5)
    assert rule_for("fedsgd", fed) == LocalRule(1, None, 0.2, 0.0)


def test_batch_schedule_is_e_epochs_of_permutations():
    batches = batch_schedule(25, LocalRule(3, 10, 0.1), torch.Generator().manual_seed(0))
    assert [b.numel() for b in batches] == [10, 10, 5] * 3  # u_k = E * ceil(n_k / B)
    for e in range(3):
        assert torch.equal(torch.sort(torch.cat(batches[3 * e : 3 * e + 3])).values, torch.arange(25))
    assert [b.numel() for b in batch_schedule(25, LocalRule(2, None, 0.1), torch.Generator())] == [25, 25]


def test_fedsgd_with_c_1_is_one_full_batch_step_on_the_union(make_config, tmp_path: Path):
    cfg = make_config(
        mode="fedsgd",
        data={"partition": "dirichlet", "alpha": 0.5},  # unequal n_k
        federated={"num_clients": 5, "fraction": 1.0, "rounds": 1, "lr": 0.3},
    )
    run_dir = create_run_dir(cfg)
    train_federated(cfg, run_dir)
    after = load_checkpoint(last_checkpoint(run_dir)).model

    dataset = load_dataset(cfg.data, cfg.seed)
    _, clients = build_clients(cfg, torch.device("cpu"))
    assert len({c.n for c in clients}) > 1
    union_x = torch.cat([c.x for c in clients])
    union_y = torch.cat([c.y for c in clients])
    model = seeded_model(cfg, dataset, torch.device("cpu"))
    loss = F.cross_entropy(model(union_x), union_y)
    loss.backward()
    with torch.no_grad():
        for name, p in model.named_parameters():
            expected = p - 0.3 * p.grad
            torch.testing.assert_close(after[name], expected, rtol=1e-5, atol=1e-6)


def test_fedprox_with_mu_zero_equals_fedavg(make_config):
    avg = make_config(mode="fedavg", data={"partition": "dirichlet"})
    prox = dataclasses.replace(avg, mode="fedprox", federated=dataclasses.replace(avg.federated, mu=0.0))
    results = []
    for cfg in (avg, prox):
        run_dir = create_run_dir(cfg)
        train_federated(cfg, run_dir)
        results.append(load_checkpoint(last_checkpoint(run_dir)).model)
    for name in results[0]:
        assert torch.equal(results[0][name], results[1][name])


def test_fedprox_gradient_carries_mu_times_drift():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3))
    apply_fn = make_apply_fn(model)
    anchor = [p.detach().clone() for p in model.parameters()]
    params = [(a + 0.1 * torch.randn_like(a)).requires_grad_(True) for a in anchor]
    x, y = torch.randn(7, 1, 3, 4), torch.randint(3, (7,))
    mu = 0.7
    prox_loss, ce = local_objective(apply_fn, params, anchor, x, y, mu)
    plain_loss, _ = local_objective(apply_fn, params, anchor, x, y, 0.0)
    g_prox = torch.autograd.grad(prox_loss, params)
    g_plain = torch.autograd.grad(plain_loss, params)
    for gp, g0, p, a in zip(g_prox, g_plain, params, anchor):
        torch.testing.assert_close(gp - g0, mu * (p.detach() - a), rtol=1e-5, atol=1e-6)
    drift = sum(((p - a) ** 2).sum() for p, a in zip(params, anchor))
    torch.testing.assert_close(prox_loss - ce, mu / 2 * drift)  # the square, with mu/2


def test_added_proximal_gradient_is_the_autograd_gradient_of_the_term():
    """What the engines add to the cross-entropy gradient, per client and stacked."""
    g = torch.Generator().manual_seed(0)
    anchor = [torch.randn(3, 4, generator=g), torch.randn(3, generator=g)]
    stacked = [a + 0.1 * torch.randn(5, *a.shape, generator=g) for a in anchor]  # 5 clients
    active = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0])
    mu = 0.7
    grads = [torch.zeros_like(p) for p in stacked]
    add_proximal_gradient_(grads, stacked, anchor, mu, active)
    for k in range(5):
        params = [p[k].clone().requires_grad_(True) for p in stacked]
        expected = torch.autograd.grad(proximal_term(params, anchor, mu), params)
        one = [torch.zeros_like(p) for p in params]
        add_proximal_gradient_(one, [p.detach() for p in params], anchor, mu)
        for got, single, want in zip(grads, one, expected):
            torch.testing.assert_close(single, want)
            torch.testing.assert_close(got[k], want * active[k])


def test_masked_cross_entropy_reduces_each_client_over_its_real_examples():
    g = torch.Generator().manual_seed(0)
    logits, y = torch.randn(2, 4, 3, generator=g), torch.randint(3, (2, 4), generator=g)
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    ce = masked_cross_entropy(logits, y, mask)
    torch.testing.assert_close(ce[0], F.cross_entropy(logits[0, :3], y[0, :3]))
    assert ce[1] == 0  # a client with no real example left
    torch.testing.assert_close(masked_cross_entropy(logits, y), torch.stack([F.cross_entropy(z, t) for z, t in zip(logits, y)]))


def test_client_update_is_plain_sgd_on_the_schedule():
    model, apply_fn, w0, x, y = tiny_linear_problem()
    rule = LocalRule(2, 4, 0.5)
    batches = batch_schedule(9, rule, torch.Generator().manual_seed(1))
    new, loss_sum = client_update(apply_fn, w0, x, y, rule, batches)
    ref = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(6, 2))
    ref.load_state_dict(model.state_dict())
    opt = torch.optim.SGD(ref.parameters(), lr=0.5)
    total = 0.0
    for idx in batches:
        opt.zero_grad()
        loss = F.cross_entropy(ref(x[idx]), y[idx])
        loss.backward()
        opt.step()
        total += loss.item()
    for a, b in zip(new, ref.parameters()):
        torch.testing.assert_close(a, b.detach())
    assert abs(loss_sum.item() - total) < 1e-5
    assert all(torch.equal(a, b) for a, b in zip(w0, [p.detach() for p in model.parameters()]))


def test_client_update_with_mu_is_sgd_on_the_fedprox_objective():
    _, apply_fn, w0, x, y = tiny_linear_problem()
    rule = LocalRule(3, 4, 0.5, mu=0.8)
    batches = batch_schedule(9, rule, torch.Generator().manual_seed(1))
    new, _ = client_update(apply_fn, w0, x, y, rule, batches)
    params = [w.clone().requires_grad_(True) for w in w0]
    for idx in batches:  # autograd through the written-out objective
        loss, _ = local_objective(apply_fn, params, w0, x[idx], y[idx], rule.mu)
        grads = torch.autograd.grad(loss, params)
        with torch.no_grad():
            for p, g in zip(params, grads):
                p -= rule.lr * g
    for a, b in zip(new, params):
        torch.testing.assert_close(a, b.detach())
    plain, _ = client_update(apply_fn, w0, x, y, LocalRule(3, 4, 0.5), batches)
    assert any(not torch.allclose(a, b) for a, b in zip(new, plain))
