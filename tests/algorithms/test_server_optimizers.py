"""Server optimizers (Reddi et al. 2021, "Adaptive Federated Optimization", Algorithm 2;
FedAvgM of Hsu et al. 2019), each checked on its first two rounds by hand.

Algorithm 2, with Delta_t the cohort's (here n_k-weighted) mean update:
    m_t = b1 m_{t-1} + (1 - b1) Delta_t                      (m_{-1} = 0)
    FedAdagrad: v_t = v_{t-1} + Delta_t^2
    FedYogi:    v_t = v_{t-1} - (1 - b2) Delta_t^2 sign(v_{t-1} - Delta_t^2)
    FedAdam:    v_t = b2 v_{t-1} + (1 - b2) Delta_t^2            (v_{-1} = tau^2)
    x_{t+1} = x_t + eta m_t / (sqrt(v_t) + tau)
Without bias correction, as in Algorithm 2; `bias_correction: true` uses Kingma & Ba's
eta_t = eta sqrt(1 - b2^t) / (1 - b1^t), t = 1, 2, ...
FedAvgM (sgd with momentum b, pseudo-gradient g = -Delta): v = b v + g, x = x - eta v.
The code keeps m in the gradient's sign (m_code = -m_Delta); v is sign-free.
"""

from __future__ import annotations

import math

import pytest
import torch

from fltool.algorithms import SERVER_OPTIMIZERS
from fltool.algorithms.api import LocalRule

X0 = [0.5, -1.0]
DELTAS = [[0.2, -0.05], [-0.1, 0.3]]  # Delta_1, Delta_2: |Delta| above and below tau = 0.1


def optimizer(fl, **section):
    cfg = fl.make_config(1, server_optimizer=section).server_optimizer
    return SERVER_OPTIMIZERS.get(section["name"])(cfg, [torch.zeros(2)])


def two_steps(opt):
    """x_1, x_2 from X0 with the pseudo-gradients -Delta_1, -Delta_2, and the state after
    each step (copied)."""
    x = [torch.tensor(X0)]
    out = []
    for delta in DELTAS:
        before = x[0].clone()
        x = opt.apply(x, [-torch.tensor(delta)])
        assert not torch.equal(x[0], before)
        out.append((x[0].clone(), {k: [t.clone() for t in v] for k, v in opt.state.items()}))
    return out


def adaptive_by_hand(rule, b1, b2, tau, eta, bias_correction=False):
    """Algorithm 2 per coordinate in float64 Python: [(x_t, m_t, v_t)] for t = 1, 2."""
    x, m, v = list(X0), [0.0, 0.0], [tau**2, tau**2]
    out = []
    for t, delta in enumerate(DELTAS, start=1):
        lr = eta * math.sqrt(1 - b2**t) / (1 - b1**t) if bias_correction else eta
        for j, d in enumerate(delta):
            m[j] = b1 * m[j] + (1 - b1) * d
            if rule == "adagrad":
                v[j] = v[j] + d * d
            elif rule == "adam":
                v[j] = b2 * v[j] + (1 - b2) * d * d
            else:  # yogi
                sign = (v[j] > d * d) - (v[j] < d * d)
                v[j] = v[j] - (1 - b2) * d * d * sign
            x[j] = x[j] + lr * m[j] / (math.sqrt(v[j]) + tau)
        out.append((list(x), list(m), list(v)))
    return out


def check(steps, expected):
    for t, ((x, state), (x_want, m_want, v_want)) in enumerate(zip(steps, expected), start=1):
        torch.testing.assert_close(x, torch.tensor(x_want), rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(state["m"][0], -torch.tensor(m_want), rtol=1e-6, atol=1e-9)
        torch.testing.assert_close(state["v"][0], torch.tensor(v_want), rtol=1e-6, atol=1e-9)
        assert state["step"][0].item() == t


@pytest.mark.parametrize("bias_correction", [False, True])
def test_fedadam_first_two_rounds_by_hand(fl, bias_correction):
    """Round 1, b1 = 0.9, b2 = 0.99, tau = 0.1, eta = 0.1, Delta_1 = (0.2, -0.05):
    m_1 = (0.02, -0.005), v_1 = 0.99 * 0.01 + 0.01 * (0.04, 0.0025) = (0.0103, 0.009925),
    x_1 = x_0 + 0.1 m_1 / (sqrt(v_1) + 0.1), then round 2 from there (`adaptive_by_hand`)."""
    opt = optimizer(fl, name="adam", lr=0.1, beta1=0.9, beta2=0.99, tau=0.1, bias_correction=bias_correction)
    steps = two_steps(opt)
    expected = adaptive_by_hand("adam", 0.9, 0.99, 0.1, 0.1, bias_correction)
    # the round-1 numbers of the docstring, literally
    assert expected[0][1] == pytest.approx([0.02, -0.005]) and expected[0][2] == pytest.approx([0.0103, 0.009925])
    lr1 = 0.1 * (math.sqrt(1 - 0.99) / (1 - 0.9) if bias_correction else 1.0)
    assert expected[0][0][0] == pytest.approx(0.5 + lr1 * 0.02 / (math.sqrt(0.0103) + 0.1))
    check(steps, expected)


def test_bias_correction_scales_each_step_by_kingma_and_bas_factor(fl):
    """The corrected step t is the uncorrected one times sqrt(1 - b2^t)/(1 - b1^t): for
    b = (0.9, 0.99) that is sqrt(0.01)/0.1 = 1 at t = 1 and 0.7425 at t = 2 (m and v,
    hence the uncorrected step, do not depend on the lr)."""
    plain = two_steps(optimizer(fl, name="adam", lr=0.1, tau=0.1))
    fixed = two_steps(optimizer(fl, name="adam", lr=0.1, tau=0.1, bias_correction=True))
    x0 = torch.tensor(X0)
    torch.testing.assert_close(fixed[0][0] - x0, 1.0 * (plain[0][0] - x0))
    factor2 = math.sqrt(1 - 0.99**2) / (1 - 0.9**2)
    assert factor2 == pytest.approx(0.7425, abs=1e-4)
    step2_plain = plain[1][0] - plain[0][0]
    torch.testing.assert_close(fixed[1][0] - fixed[0][0], factor2 * step2_plain)


@pytest.mark.parametrize("beta1", [0.0, 0.9])
def test_fedadagrad_first_two_rounds_by_hand(fl, beta1):
    """v_t = v_{t-1} + Delta_t^2 from tau^2; beta1 = 0 is the paper's FedAdagrad (m_t = Delta_t)."""
    steps = two_steps(optimizer(fl, name="adagrad", lr=0.1, beta1=beta1, tau=0.1))
    expected = adaptive_by_hand("adagrad", beta1, 0.99, 0.1, 0.1)
    assert expected[1][2] == pytest.approx([0.01 + 0.04 + 0.01, 0.01 + 0.0025 + 0.09])
    check(steps, expected)


def test_fedyogi_first_two_rounds_by_hand(fl):
    """Round 1 takes both signs: Delta^2 = 0.04 > tau^2 = 0.01 raises v to 0.01 + 0.01 * 0.04,
    Delta^2 = 0.0025 < 0.01 lowers it to 0.01 - 0.01 * 0.0025."""
    steps = two_steps(optimizer(fl, name="yogi", lr=0.1, beta1=0.9, beta2=0.99, tau=0.1))
    expected = adaptive_by_hand("yogi", 0.9, 0.99, 0.1, 0.1)
    assert expected[0][2] == pytest.approx([0.01 + 0.01 * 0.04, 0.01 - 0.01 * 0.0025])
    check(steps, expected)


def test_fedavgm_is_heavy_ball_momentum_on_minus_delta(fl):
    """v_1 = g_1, x_1 = x_0 - eta v_1; v_2 = b v_1 + g_2, x_2 = x_1 - eta v_2 (g = -Delta)."""
    opt = optimizer(fl, name="sgd", lr=0.5, momentum=0.9)
    steps = two_steps(opt)
    g1, g2 = (-torch.tensor(d) for d in DELTAS)
    x1 = torch.tensor(X0) - 0.5 * g1
    v2 = 0.9 * g1 + g2
    x2 = x1 - 0.5 * v2
    torch.testing.assert_close(steps[0][0], x1)
    torch.testing.assert_close(steps[0][1]["momentum"][0], g1)
    torch.testing.assert_close(steps[1][0], x2)
    torch.testing.assert_close(steps[1][1]["momentum"][0], v2)


def test_sgd_without_momentum_keeps_no_state_and_scales_delta(fl):
    """x + eta Delta; at the default eta = 1, x + Delta (FedAvg)."""
    for lr in (1.0, 0.25):
        opt = optimizer(fl, name="sgd", lr=lr)
        assert opt.state == {}
        steps = two_steps(opt)
        torch.testing.assert_close(steps[0][0], torch.tensor(X0) + lr * torch.tensor(DELTAS[0]))
        torch.testing.assert_close(steps[1][0], steps[0][0] + lr * torch.tensor(DELTAS[1]))
    default = fl.make_config(1).server_optimizer
    assert (default.name, default.lr, getattr(default, "momentum")) == ("sgd", 1.0, 0.0)


def test_apply_leaves_its_inputs_alone(fl):
    """The trainer copies the returned model into the global one afterwards: apply must
    not write into the params (or the pseudo-gradient) it is handed."""
    for section in ({"name": "sgd"}, {"name": "sgd", "momentum": 0.5, "lr": 0.3}, {"name": "adam"}, {"name": "yogi"}, {"name": "adagrad"}):
        opt = optimizer(fl, **section)
        x, g = [torch.tensor(X0)], [torch.tensor([0.3, -0.2])]
        new = opt.apply(x, g)
        assert torch.equal(x[0], torch.tensor(X0)) and torch.equal(g[0], torch.tensor([0.3, -0.2]))
        assert not torch.equal(new[0], x[0])


def test_fedadam_in_the_real_round_uses_the_weighted_mean_update(fl, engine):
    """Two FedAvg rounds with FedAdam on the server: Delta_t is sum_k n_k/n (w_k - x_t)
    of the clients' local SGD (written out), then Algorithm 2's step, bias-corrected."""
    b1, b2, tau, eta = 0.9, 0.99, 0.05, 0.1
    section = {"name": "adam", "lr": eta, "beta1": b1, "beta2": b2, "tau": tau, "bias_correction": True}
    cfg = fl.make_config(3, server_optimizer=section, local_epochs=2, batch_size=2, lr=0.3)
    clients = fl.make_clients([3, 6, 4])
    cohorts = [[0, 1, 2], [0, 2]]
    run = fl.run_rounds(cfg, fl.linear_model(), clients, cohorts, engine)
    rule = LocalRule(2, 2, 0.3)
    x = run.history[0]
    m = [torch.zeros_like(p) for p in x]
    v = [torch.full_like(p, tau**2) for p in x]
    for t, cohort in enumerate(cohorts, start=1):
        n = sum(clients[k].n for k in cohort)
        local = {k: fl.local_sgd(x, clients[k], fl.schedule(cfg, rule, t, clients[k]), rule.lr) for k in cohort}
        delta = [sum(clients[k].n / n * (local[k][i] - x[i]) for k in cohort) for i in range(2)]
        m = [b1 * a + (1 - b1) * d for a, d in zip(m, delta)]
        v = [b2 * a + (1 - b2) * d * d for a, d in zip(v, delta)]
        lr = eta * math.sqrt(1 - b2**t) / (1 - b1**t)
        x = [xi + lr * mi / (vi.sqrt() + tau) for xi, mi, vi in zip(x, m, v)]
        fl.assert_params_close(run.history[t], x, rtol=1e-5, atol=1e-6)
    fl.assert_params_close([-t for t in run.state.optimizer.state["m"]], m)
    fl.assert_params_close(run.state.optimizer.state["v"], v)


def test_fedavgm_in_the_real_round(fl, engine):
    """Two FedAvg rounds with server momentum 0.8 and eta = 0.7 against the written-out
    heavy ball on g_t = -sum_k n_k/n (w_k - x_t)."""
    cfg = fl.make_config(3, server_optimizer={"name": "sgd", "lr": 0.7, "momentum": 0.8}, lr=0.3, local_epochs=2)
    clients = fl.make_clients([3, 6, 4])
    cohorts = [[0, 1, 2], [1, 2]]
    run = fl.run_rounds(cfg, fl.linear_model(), clients, cohorts, engine)
    rule = LocalRule(2, None, 0.3)
    x, buf = run.history[0], None
    for t, cohort in enumerate(cohorts, start=1):
        n = sum(clients[k].n for k in cohort)
        local = {k: fl.local_sgd(x, clients[k], fl.schedule(cfg, rule, t, clients[k]), 0.3) for k in cohort}
        g = [-sum(clients[k].n / n * (local[k][i] - x[i]) for k in cohort) for i in range(2)]
        buf = g if buf is None else [0.8 * b + gi for b, gi in zip(buf, g)]
        x = [xi - 0.7 * b for xi, b in zip(x, buf)]
        fl.assert_params_close(run.history[t], x)


def test_sgd_lr_1_momentum_0_is_plain_fedavg(fl, engine):
    """The default server step reproduces McMahan's w_{t+1} = sum_k n_k/n w_k exactly as
    an explicit sgd section does (bit for bit), and matches the weighted mean."""
    clients = fl.make_clients([3, 6, 4])
    runs = [
        fl.run_rounds(fl.make_config(3, server_optimizer=s, lr=0.3), fl.linear_model(), clients, [[0, 1, 2]], engine)
        for s in (None, {"name": "sgd", "lr": 1.0, "momentum": 0.0})
    ]
    assert all(torch.equal(a, b) for a, b in zip(runs[0].final, runs[1].final))
    x = runs[0].history[0]
    local = [fl.local_sgd(x, c, [torch.arange(c.n)], 0.3) for c in clients]
    fl.assert_params_close(runs[0].final, [sum(c.n / 13 * w[i] for c, w in zip(clients, local)) for i in range(2)])
