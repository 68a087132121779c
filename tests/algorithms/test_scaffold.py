"""SCAFFOLD (Karimireddy et al. 2020, "SCAFFOLD: Stochastic Controlled Averaging for
Federated Learning", Algorithm 1), written out by hand and compared with the real round.

Algorithm 1, for each sampled client i in S (|S| of N):
    y_i <- x;  for k = 1..K:  y_i <- y_i - eta_l (g_i(y_i) - c_i + c)          (line 10)
    c_i+ <- option I:  g_i(x)   (gradient at the server model x)               (line 12)
            option II: c_i - c + (x - y_i) / (K eta_l)
    upload (Delta y_i, Delta c_i) = (y_i - x, c_i+ - c_i);  c_i <- c_i+         (line 13)
server:
    x <- x + eta_g (1/|S|) sum_{i in S} Delta y_i                               (line 16)
    c <- c + (1/N) sum_{i in S} Delta c_i                                       (line 17)
Clients not in S keep their c_i. Clients count equally (the paper's (1/N) sum_i f_i),
whatever their n_i. Here g_i is the minibatch gradient of client i's own schedule
(option I: its whole local data at x), K_i its number of local steps and eta_g the
server optimizer's lr.
"""

from __future__ import annotations

import pytest
import torch

from fltool.algorithms import ALGORITHMS, ClientInfo
from fltool.algorithms.scaffold import Scaffold, ScaffoldConfig
from fltool.config.schema import FederatedConfig

SIZES = [3, 5, 8, 4]  # B = 2: K_i = 2, 3, 4, 2 per epoch, so K_i differ too
COHORTS = [[0, 1, 2], [1, 3]]  # client 3 sits out round 1; clients 0 and 2 sit out round 2
LR, SERVER_LR = 0.2, 0.5


def reference_scaffold(fl, cfg, clients, cohorts, option):
    """Algorithm 1 in plain torch: x, c and every c_i after each round."""
    n_clients = len(clients)
    rule = ALGORITHMS.get("scaffold")(cfg.algorithm, cfg.federated).rule
    x = [p.detach().clone() for p in fl.linear_model().parameters()]
    c = [torch.zeros_like(p) for p in x]
    c_i = [[torch.zeros_like(p) for p in x] for _ in range(n_clients)]
    history = []
    for r, cohort in enumerate(cohorts, start=1):
        dy, dc, new_c_i = [], [], {}
        for i in cohort:
            batches = fl.schedule(cfg, rule, r, clients[i])
            correction = [cc - ci for cc, ci in zip(c, c_i[i])]  # -c_i + c
            y = fl.local_sgd(x, clients[i], batches, rule.lr, extra=lambda w, corr=correction: corr)
            big_k = len(batches)
            if option == 1:
                plus = fl.ce_gradient(x, clients[i].x, clients[i].y)
            else:
                plus = [ci - cc + (xx - yy) / (big_k * rule.lr) for ci, cc, xx, yy in zip(c_i[i], c, x, y)]
            dy.append([yy - xx for yy, xx in zip(y, x)])
            dc.append([p - ci for p, ci in zip(plus, c_i[i])])
            new_c_i[i] = plus
        x = [xx + SERVER_LR * sum(d[j] for d in dy) / len(cohort) for j, xx in enumerate(x)]
        c = [cc + sum(d[j] for d in dc) / n_clients for j, cc in enumerate(c)]
        for i, plus in new_c_i.items():
            c_i[i] = plus
        history.append((x, c, [list(ci) for ci in c_i]))
    return history


def config(fl, option, **federated):
    fed = {"local_epochs": 1, "batch_size": 2, "lr": LR, **federated}
    return fl.make_config(
        len(SIZES), algorithm={"name": "scaffold", "option": option}, server_optimizer={"name": "sgd", "lr": SERVER_LR}, **fed
    )


def client_rows(run, n_clients):
    return run.state.clients.rows(list(range(n_clients)))["c"]


@pytest.mark.parametrize("option", [2, 1])
def test_two_rounds_match_algorithm_1_by_hand(fl, engine, option):
    """x, c and every client's c_i after rounds 1 and 2, each round checked on its own
    (the round-1 state comes from a one-round run)."""
    clients = fl.make_clients(SIZES)
    cfg = config(fl, option)
    expected = reference_scaffold(fl, cfg, clients, COHORTS, option)
    for rounds in (1, 2):
        run = fl.run_rounds(cfg, fl.linear_model(), clients, COHORTS[:rounds], engine)
        x, c, c_i = expected[rounds - 1]
        fl.assert_params_close(run.final, x)
        fl.assert_params_close(run.state.server["c"], c)
        rows = client_rows(run, len(SIZES))
        for i in range(len(SIZES)):
            fl.assert_params_close([t[i] for t in rows], c_i[i])
    # the control variates are not trivially zero
    assert all(float(t.abs().max()) > 1e-3 for t in run.state.server["c"])


@pytest.mark.parametrize("option", [2, 1])
def test_clients_not_sampled_keep_their_control_variate_and_c_is_their_mean(fl, engine, option):
    """c_i of a client outside S is untouched (bit for bit); since every c_i and c start
    at 0 and c moves by (1/N) sum Delta c_i, c = (1/N) sum_{i=1..N} c_i after every round."""
    clients, cfg = fl.make_clients(SIZES), config(fl, option)
    one = fl.run_rounds(cfg, fl.linear_model(), clients, COHORTS[:1], engine)
    two = fl.run_rounds(cfg, fl.linear_model(), clients, COHORTS, engine)
    rows1, rows2 = client_rows(one, 4), client_rows(two, 4)
    assert all(torch.equal(t[3], torch.zeros_like(t[3])) for t in rows1)  # never sampled yet
    for i in (0, 2):  # sampled in round 1 only
        assert all(torch.equal(a[i], b[i]) for a, b in zip(rows1, rows2))
    for i in (1, 3):
        assert all(not torch.equal(a[i], b[i]) for a, b in zip(rows1, rows2))
    for run in (one, two):
        rows = client_rows(run, 4)
        fl.assert_params_close(run.state.server["c"], [t.mean(0) for t in rows])


def test_the_server_lr_scales_the_model_step_but_not_c(fl):
    """x <- x + eta_g * mean Delta y (line 16): the step at eta_g = 0.5 is half the step
    at eta_g = 1; c (line 17) does not depend on eta_g."""
    clients = fl.make_clients(SIZES)
    runs = {}
    for eta in (0.5, 1.0):
        cfg = fl.make_config(len(SIZES), algorithm={"name": "scaffold"}, server_optimizer={"name": "sgd", "lr": eta}, batch_size=2, lr=LR)
        runs[eta] = fl.run_rounds(cfg, fl.linear_model(), clients, COHORTS[:1])
    w0 = runs[1.0].history[0]
    for a, b, w in zip(runs[0.5].final, runs[1.0].final, w0):
        torch.testing.assert_close(a - w, 0.5 * (b - w))
    fl.assert_params_close(runs[0.5].state.server["c"], runs[1.0].state.server["c"])


def test_clients_count_equally_whatever_their_sizes(fl):
    """Line 16 averages Delta y_i with 1/|S|: with n = (1, 9) and E = 1, B = inf (one
    step each, c = c_i = 0 in round 1), x+ = x - eta_l * (g_0 + g_1) / 2 at eta_g = 1."""
    cfg = fl.make_config(2, algorithm={"name": "scaffold"}, lr=0.6)
    clients = fl.make_clients([1, 9])
    run = fl.run_rounds(cfg, fl.linear_model(), clients, [[0, 1]])
    w = run.history[0]
    g0, g1 = (fl.ce_gradient(w, c.x, c.y) for c in clients)
    fl.assert_params_close(run.final, [w[i] - 0.6 * (g0[i] + g1[i]) / 2 for i in range(2)])


def test_the_local_gradient_is_g_minus_c_i_plus_c():
    """Line 10's corrected gradient, per client of a stack, kept off an inactive client."""
    algo = Scaffold(ScaffoldConfig(name="scaffold"), FederatedConfig(lr=0.1))
    g = torch.Generator().manual_seed(0)
    params = [torch.randn(3, 2, generator=g), torch.randn(2, generator=g)]
    server = {"c": [torch.randn(3, 2, generator=g), torch.randn(2, generator=g)]}
    rows = {"c": [torch.randn(4, 3, 2, generator=g), torch.randn(4, 2, generator=g)]}  # 4 clients
    context = algo.client_context(server, rows, params)
    grads = [torch.randn(4, 3, 2, generator=g), torch.randn(4, 2, generator=g)]
    original = [t.clone() for t in grads]
    active = torch.tensor([1.0, 1.0, 0.0, 1.0])
    stacked = [p.unsqueeze(0).expand(4, *p.shape) for p in params]
    algo.adjust_gradients_(grads, stacked, params, context, active)
    for k in range(4):
        for got, g0, c, ci in zip(grads, original, server["c"], rows["c"]):
            want = g0[k] - ci[k] + c if active[k] else g0[k]
            torch.testing.assert_close(got[k], want)
    assert algo.adjusts_gradients


def test_option_ii_upload_by_hand():
    """c_i+ = c_i - c + (x - y_i)/(K_i eta_l); the upload is (y_i - x, c_i+ - c_i) with weight 1."""
    algo = Scaffold(ScaffoldConfig(name="scaffold", option=2), FederatedConfig(lr=0.5))
    assert not algo.needs_global_gradient
    x = [torch.tensor([1.0, 2.0])]
    server = {"c": [torch.tensor([0.5, -0.5])]}
    rows = {"c": [torch.tensor([[1.0, 1.0], [0.0, -2.0]])]}
    y = [torch.tensor([[0.0, 2.0], [2.0, 0.0]])]
    info = ClientInfo(ids=torch.tensor([3, 7]), n=torch.tensor([5.0, 50.0]), steps=torch.tensor([2.0, 4.0]))
    up = algo.client_upload(x, y, algo.client_context(server, rows, x), info)
    # client 0: (1,1) - (0.5,-0.5) + ((1,2)-(0,2))/(2*0.5) = (0.5, 1.5) + (1, 0) = (1.5, 1.5)
    # client 1: (0,-2) - (0.5,-0.5) + ((1,2)-(2,0))/(4*0.5) = (-0.5,-1.5) + (-0.5, 1) = (-1, -0.5)
    torch.testing.assert_close(up.state["c"][0], torch.tensor([[1.5, 1.5], [-1.0, -0.5]]))
    torch.testing.assert_close(up.extras["c"][0], torch.tensor([[0.5, 0.5], [-1.0, 1.5]]))
    torch.testing.assert_close(up.delta[0], torch.tensor([[-1.0, 0.0], [1.0, -2.0]]))
    assert torch.equal(up.weight, torch.ones(2))


def test_option_i_upload_takes_the_full_data_gradient_at_x():
    algo = Scaffold(ScaffoldConfig(name="scaffold", option=1), FederatedConfig(lr=0.5))
    assert algo.needs_global_gradient
    x = [torch.tensor([1.0, 2.0])]
    rows = {"c": [torch.tensor([[1.0, 1.0]])]}
    context = {**algo.client_context({"c": [torch.zeros(2)]}, rows, x), "global_grad": [torch.tensor([[3.0, -4.0]])]}
    info = ClientInfo(ids=torch.tensor([0]), n=torch.tensor([5.0]), steps=torch.tensor([2.0]))
    up = algo.client_upload(x, [torch.tensor([[0.0, 0.0]])], context, info)
    torch.testing.assert_close(up.state["c"][0], torch.tensor([[3.0, -4.0]]))
    torch.testing.assert_close(up.extras["c"][0], torch.tensor([[2.0, -5.0]]))


def test_the_context_keeps_the_layout_of_the_clients_rows():
    """The correction is added to every local step's gradient: in the layout of the
    stacked rows (the engine's, see ClientStore) that add sweeps memory linearly."""
    algo = Scaffold(ScaffoldConfig(name="scaffold"), FederatedConfig(lr=0.1))
    c_i = torch.randn(4, 2, 3).transpose(1, 2).contiguous().transpose(1, 2)
    c = torch.randn(2, 3)
    context = algo.client_context({"c": [c]}, {"c": [c_i]}, [torch.zeros(2, 3)])
    assert context["correction"][0].stride() == c_i.stride()
    assert torch.equal(context["correction"][0], c - c_i)


def test_option_must_be_1_or_2(fl):
    from fltool.errors import FltoolError

    with pytest.raises(FltoolError, match="algorithm.option"):
        fl.make_config(2, algorithm={"name": "scaffold", "option": 3})
