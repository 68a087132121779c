"""Attacks against their definitions on hand-made uploads, and one in a real round.

sign_flip uploads -k delta; scaling gamma delta (gamma = the cohort size by default,
Bagdasaryan et al. 2020's model replacement at server lr 1); label_flip trains on
y -> C - 1 - y; gaussian uploads N(0, std^2) noise seeded per (seed, round, client);
alie (Baruch et al. 2019) uploads mu - z sigma of the cohort's honest updates, z_max
from the paper's formula.
"""

from __future__ import annotations

import math
from statistics import NormalDist

import pytest
import torch

from fltool.algorithms import ATTACKS, Upload
from fltool.algorithms.attacks.alie import z_max
from fltool.config.registry import ATTACKS as REGISTRY
from fltool.distributed.comm import Comm
from fltool.trainers.federated import FederatedState, build_algorithm, train_round
from fltool.engines import make_engine


def make_attack(name: str, **settings):
    config = REGISTRY.config_class(name)(name=name, **settings)
    return ATTACKS.get(name)(config, seed=7)


def chunk(rows: list[list[float]], weights: list[float] | None = None) -> Upload:
    t = torch.tensor(rows)
    return Upload(delta=[t, 2 * t[:, :1]], weight=torch.tensor(weights or [1.0] * len(rows)))


def test_every_attack_is_registered():
    assert set(ATTACKS.names()) == {"none", "sign_flip", "scaling", "label_flip", "gaussian", "alie"}


def test_sign_flip_reverses_and_scales_only_the_malicious_rows():
    attack = make_attack("sign_flip", k=3.0)
    attack.start_round(1, cohort=3, malicious=1)
    up = chunk([[1.0, 2.0], [3.0, -4.0], [5.0, 6.0]], [10.0, 20.0, 30.0])
    _, out = attack.corrupt(torch.tensor([4, 5, 6]), up, torch.tensor([False, True, False]))
    torch.testing.assert_close(out.delta[0], torch.tensor([[1.0, 2.0], [-9.0, 12.0], [5.0, 6.0]]))
    torch.testing.assert_close(out.delta[1], torch.tensor([[2.0], [-18.0], [10.0]]))
    assert torch.equal(out.weight, up.weight)


def test_scaling_defaults_to_the_cohort_size():
    attack = make_attack("scaling")
    attack.start_round(1, cohort=4, malicious=1)
    _, out = attack.corrupt(torch.tensor([0, 1]), chunk([[1.0, 2.0], [1.0, 1.0]]), torch.tensor([True, False]))
    torch.testing.assert_close(out.delta[0], torch.tensor([[4.0, 8.0], [1.0, 1.0]]))
    fixed = make_attack("scaling", factor=0.5)
    fixed.start_round(1, cohort=4, malicious=1)
    _, out = fixed.corrupt(torch.tensor([0, 1]), chunk([[1.0, 2.0], [1.0, 1.0]]), torch.tensor([True, False]))
    torch.testing.assert_close(out.delta[0], torch.tensor([[0.5, 1.0], [1.0, 1.0]]))


def test_label_flip_maps_y_to_c_minus_1_minus_y():
    attack = make_attack("label_flip")
    assert attack.poison_labels(torch.tensor([0, 1, 9, 4]), 10).tolist() == [9, 8, 0, 5]


def test_gaussian_noise_is_per_client_seeded_and_independent_of_chunking():
    attack = make_attack("gaussian", std=2.0)
    attack.start_round(3, cohort=4, malicious=2)
    rows = torch.arange(8.0).view(4, 2).tolist()
    mask = torch.tensor([True, False, True, False])
    _, whole = attack.corrupt(torch.tensor([1, 2, 3, 4]), chunk(rows), mask)
    _, first = attack.corrupt(torch.tensor([1, 2]), chunk(rows[:2]), mask[:2])
    _, second = attack.corrupt(torch.tensor([3, 4]), chunk(rows[2:]), mask[2:])
    for p in range(2):
        assert torch.equal(whole.delta[p], torch.cat([first.delta[p], second.delta[p]]))
    torch.testing.assert_close(whole.delta[0][1], torch.tensor([2.0, 3.0]))  # honest rows untouched
    assert not torch.equal(whole.delta[0][0], torch.tensor([0.0, 1.0]))
    _, big = attack.corrupt(torch.tensor([9]), Upload(delta=[torch.zeros(1, 20000)], weight=torch.ones(1)), torch.tensor([True]))
    assert big.delta[0].std().item() == pytest.approx(2.0, rel=0.03)
    attack.start_round(4, cohort=4, malicious=2)  # another round, other noise
    _, again = attack.corrupt(torch.tensor([1, 2, 3, 4]), chunk(rows), mask)
    assert not torch.equal(again.delta[0][0], whole.delta[0][0])


def test_alie_z_max_follows_baruch_et_al():
    # n = 50, f = 12 (their setting): s = floor(26) - 12 = 14, z = Phi^-1(36 / 50)
    assert z_max(50, 12) == pytest.approx(NormalDist().inv_cdf(36 / 50))
    assert z_max(50, 12) == pytest.approx(0.5828, abs=1e-4)
    assert z_max(10, 1) == pytest.approx(0.0, abs=1e-12)  # s = 5 of 10: no room


def test_alie_sends_mean_minus_z_std_of_the_cohort_for_every_malicious_client():
    attack = make_attack("alie", z=1.5)
    attack.start_round(2, cohort=4, malicious=2)
    rows = [[1.0, 0.0], [3.0, 2.0], [5.0, 0.0], [7.0, 2.0]]
    mask = torch.tensor([False, True, False, True])
    ids_a, kept_a = attack.corrupt(torch.tensor([0, 1]), chunk(rows[:2], [1.0, 2.0]), mask[:2])
    ids_b, kept_b = attack.corrupt(torch.tensor([2, 3]), chunk(rows[2:], [3.0, 4.0]), mask[2:])
    assert ids_a.tolist() == [0] and ids_b.tolist() == [2]
    # honest rows pass through, malicious ones are held back until the cohort is seen
    torch.testing.assert_close(kept_a.delta[0], torch.tensor([[1.0, 0.0]]))
    torch.testing.assert_close(kept_b.delta[0], torch.tensor([[5.0, 0.0]]))
    ids, held = attack.finish(Comm())
    assert ids.tolist() == [1, 3] and held.weight.tolist() == [2.0, 4.0]
    mean = torch.tensor([4.0, 1.0])
    std = torch.tensor([math.sqrt((9 + 1 + 1 + 9) / 4), 1.0])  # population std over the 4 clients
    crafted = mean - 1.5 * std
    torch.testing.assert_close(held.delta[0], crafted.expand(2, 2))
    torch.testing.assert_close(held.delta[1], (2 * mean[:1] - 1.5 * 2 * std[:1]).expand(2, 1))


def test_sign_flip_in_a_real_fedavg_round(fl, engine):
    """x+ = x + sum_k n_k u_k / n with u_k = -k (w_k - x) for the malicious client."""
    clients = fl.make_clients([3, 5, 4])
    cfg = fl.make_config(3, local_epochs=1, lr=0.3)
    cfg.attack = REGISTRY.config_class("sign_flip")(name="sign_flip", fraction=0.3, k=4.0)
    model = fl.linear_model()
    algorithm = build_algorithm(cfg)
    params = [p.detach().clone() for p in model.parameters()]
    state = FederatedState(cfg, algorithm, params, torch.device("cpu"))
    attack = ATTACKS.get("sign_flip")(cfg.attack, cfg.seed)
    attack.start_round(1, 3, 1)
    malicious = torch.tensor([False, True, False])
    eng = make_engine(engine, model, cfg.seed, max_parallel_clients=None, cuda_graphs=False)
    new, _, _ = train_round(eng, algorithm, state, params, clients, 1, cfg, Comm(), 3, attack, malicious)
    x = [p.detach().clone() for p in fl.linear_model().parameters()]
    n = sum(c.n for c in clients)
    expected = [xi.clone() for xi in x]
    for c in clients:
        w = fl.local_sgd(x, c, [torch.arange(c.n)], 0.3)
        sign = -4.0 if c.id == 1 else 1.0
        expected = [e + sign * c.n / n * (wi - xi) for e, wi, xi in zip(expected, w, x)]
    fl.assert_params_close(new, expected)
