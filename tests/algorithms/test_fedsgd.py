"""FedSGD (McMahan et al. 2017, Section 2, the FederatedSGD baseline).

Each client computes g_k = grad F_k(w_t), the gradient of its mean loss over all its
n_k examples, and the server applies w_{t+1} = w_t - eta sum_k (n_k / n) g_k, which
(by linearity) is one step of full-batch gradient descent on the union of the
cohort's data: sum_k n_k/n grad F_k = grad of the mean loss over all n examples.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fltool.algorithms import ALGORITHMS, LocalRule
from fltool.config.schema import AlgorithmConfig, FederatedConfig


def test_the_local_rule_is_one_full_batch_step_whatever_e_and_b_say():
    algo = ALGORITHMS.get("fedsgd")(AlgorithmConfig(name="fedsgd"), FederatedConfig(local_epochs=5, batch_size=10, lr=0.2))
    assert algo.rule == LocalRule(epochs=1, batch_size=None, lr=0.2)
    assert not algo.adjusts_gradients and not algo.needs_global_gradient


def test_a_round_is_one_gradient_step_on_the_union_of_the_cohorts_data(fl, engine):
    """w_{t+1} = w_t - eta * grad (1/n) sum_{i in union} l(w_t; x_i, y_i), checked on two
    rounds (the second from the first's result) with unequal n_k; local_epochs and
    batch_size in the config are ignored."""
    sizes = [2, 5, 9, 4]
    cfg = fl.make_config(len(sizes), algorithm={"name": "fedsgd"}, local_epochs=3, batch_size=2, lr=0.7)
    model, clients = fl.linear_model(), fl.make_clients(sizes)
    cohorts = [[0, 1, 2], [1, 2, 3]]
    run = fl.run_rounds(cfg, model, clients, cohorts, engine)
    for r, cohort in enumerate(cohorts, start=1):
        w = [t.clone().requires_grad_(True) for t in run.history[r - 1]]
        x = torch.cat([clients[k].x for k in cohort])
        y = torch.cat([clients[k].y for k in cohort])
        grads = torch.autograd.grad(F.cross_entropy(fl.logits(w, x), y), w)
        expected = [wi.detach() - 0.7 * g for wi, g in zip(w, grads)]
        fl.assert_params_close(run.history[r], expected)


def test_it_weights_clients_by_examples_not_equally(fl):
    """The union's mean weights client k by n_k/n: with n = (1, 9) the step is not the
    plain mean of the two clients' gradients."""
    cfg = fl.make_config(2, algorithm={"name": "fedsgd"}, lr=1.0)
    model, clients = fl.linear_model(), fl.make_clients([1, 9])
    run = fl.run_rounds(cfg, model, clients, [[0, 1]])
    w = run.history[0]
    g0, g1 = (fl.ce_gradient(w, c.x, c.y) for c in clients)
    weighted = [w[i] - (0.1 * g0[i] + 0.9 * g1[i]) for i in range(2)]
    equal = [w[i] - (0.5 * g0[i] + 0.5 * g1[i]) for i in range(2)]
    fl.assert_params_close(run.final, weighted)
    assert not torch.allclose(run.final[0], equal[0], atol=1e-4)
