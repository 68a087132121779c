"""Robust aggregators against their definitions, on updates small enough to check by
hand: trimmed mean (Yin et al. 2018), Krum and Multi-Krum (Blanchard et al. 2017),
Bulyan (El Mhamdi et al. 2018), norm-bounded averaging (Sun et al. 2019). Each
`reference_*` is the definition written out with Python loops, independent of the code."""

from __future__ import annotations

import pytest
import torch

from fltool.algorithms import AGGREGATORS, Upload
from fltool.algorithms.aggregators import bulyan, krum, norm_bounded, trimmed_mean
from fltool.algorithms.aggregators.trimmed_mean import TrimmedMeanConfig, trimmed_count
from fltool.distributed.comm import Comm
from fltool.errors import FltoolError

ROBUST = ["trimmed_mean", "krum", "multikrum", "bulyan", "norm_bounded"]


def aggregate(name: str, rows, ids=None, weights=None, **settings) -> torch.Tensor:
    """`name` over one-parameter updates `rows` (one chunk per client, in `ids` order)."""
    agg = AGGREGATORS.get(name)(AGGREGATORS.config_class(name)(name=name, **settings))
    rows = torch.as_tensor(rows, dtype=torch.float32)
    ids = list(range(len(rows))) if ids is None else ids
    weights = [1.0] * len(rows) if weights is None else weights
    for k, row, w in zip(ids, rows, weights):
        agg.add(torch.tensor([k]), Upload(delta=[row[None]], weight=torch.tensor([w])))
    return agg.reduce(Comm(), [], len(rows), len(rows)).delta[0]


def reference_scores(rows: torch.Tensor, f: int, neighbours: int | None = None) -> list[float]:
    n = len(rows)
    k = n - f - 2 if neighbours is None else neighbours
    return [sum(sorted(((rows[i] - rows[j]) ** 2).sum().item() for j in range(n) if j != i)[:k]) for i in range(n)]


def test_registered_names():
    for name, module in zip(ROBUST, [trimmed_mean, krum, krum, bulyan, norm_bounded]):
        assert AGGREGATORS.get(name).__module__ == module.__name__ and AGGREGATORS.config_class(name)().name == name


def test_trimmed_mean_beta_zero_is_the_plain_mean_and_ties_are_trimmed():
    rows = torch.randn(5, 3, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(aggregate("trimmed_mean", rows, weights=[1, 2, 3, 4, 5], beta=0.0), rows.mean(0))
    # b = floor(0.25 * 4) = 1: [1, 1, 1, 5] -> mean(1, 1); [0, 2, 4, 4] -> mean(2, 4)
    got = aggregate("trimmed_mean", [[1.0, 0.0], [1.0, 2.0], [1.0, 4.0], [5.0, 4.0]], beta=0.25)
    torch.testing.assert_close(got, torch.tensor([1.0, 3.0]))
    assert [trimmed_count(b, m) for b, m in [(0.1, 10), (0.1, 9), (0.29, 100), (0.49, 3)]] == [1, 0, 29, 1]
    assert TrimmedMeanConfig(beta=0.5).problem(4) is not None  # built in code, past the field check


def test_krum_with_one_neighbour_breaks_ties_by_client_id():
    """n = f + 3 = 4, one neighbour: scores 1, 1, 4, 49 for 0, 1, 3, 10. The tied pair
    arrives as ids 7 then 2 (chunk order); id 2's update wins, whatever the order."""
    rows = torch.tensor([[0.0], [1.0], [3.0], [10.0]])
    assert reference_scores(rows, 1) == [1.0, 1.0, 4.0, 49.0]
    assert aggregate("krum", rows, f=1).item() == 0.0
    assert aggregate("krum", [[1.0], [0.0], [3.0], [10.0]], ids=[2, 7, 5, 9], f=1).item() == 1.0
    assert aggregate("krum", [[0.0], [1.0], [3.0], [10.0]], ids=[7, 2, 5, 9], f=1).item() == 1.0


@pytest.mark.parametrize(("name", "settings", "n"), [("krum", {"f": 2}, 4), ("multikrum", {"f": 1, "m": 4}, 4), ("bulyan", {"f": 1}, 6)])
def test_too_few_updates_for_the_rule_is_one_line_at_combine_time(name: str, settings: dict, n: int):
    """A config built in code skips the load-time check; a round with fewer updates
    than the rule needs fails in one line, not with a topk range error."""
    with pytest.raises(FltoolError, match="^aggregator[.](f|m): "):
        aggregate(name, torch.arange(float(n))[:, None], **settings)


def test_krum_never_selects_a_far_or_nan_outlier_and_multikrum_averages_the_best():
    """Four corners of a square and one far update, f = 1, two neighbours: every corner
    scores 4 + 4 = 8, so Krum returns corner 0 and Multi-Krum (m = n - f = 4) their mean."""
    square = [[0.0, 0.0], [2.0, 0.0], [0.0, 2.0], [2.0, 2.0]]
    assert reference_scores(torch.tensor(square + [[100.0, 100.0]]), 1)[:4] == [8.0] * 4
    for outlier in ([100.0, 100.0], [float("nan"), 1.0], [1e30, -1e30]):
        for at in (0, 4):
            rows = square[:at] + [outlier] + square[at:]
            torch.testing.assert_close(aggregate("krum", rows, f=1), torch.tensor(square[0]))
            torch.testing.assert_close(aggregate("multikrum", rows, f=1), torch.tensor([1.0, 1.0]))
            assert not torch.isnan(aggregate("bulyan", rows + square[:2], f=1)).any()
    # m = 2 of the lowest scores, ties by row order: corners 0 and 1
    torch.testing.assert_close(aggregate("multikrum", square + [[9.0, 9.0]], f=1, m=2), torch.tensor([1.0, 0.0]))


def test_krum_and_multikrum_equal_their_definition_on_random_updates():
    g = torch.Generator().manual_seed(3)
    for n, f in [(5, 1), (9, 2), (12, 3)]:
        rows = torch.randn(n, 7, generator=g) * torch.rand(n, 1, generator=g) * 4
        scores = torch.tensor(reference_scores(rows, f))
        torch.testing.assert_close(aggregate("krum", rows, f=f), rows[scores.argmin()])
        best = scores.argsort()[: n - f]
        torch.testing.assert_close(aggregate("multikrum", rows, f=f), rows[best].mean(0))


def test_bulyan_on_n_equal_4f_plus_3_by_hand():
    """f = 1, n = 7, theta = 5, beta = 3 on 0..4 with outliers 100 and -50 (ids 5, 6).
    Recursive Krum picks 2 (score 10), 1 (tie with 3 at 14), 3, 0 (tie with 4 at 16),
    4 (one neighbour kept at |R| = 3); per coordinate the 3 values nearest the median 2
    are 1, 2, 3. The second coordinate is the first negated (distances double)."""
    xs = [0.0, 1.0, 2.0, 3.0, 4.0, 100.0, -50.0]
    rows = torch.tensor([[x, -x] for x in xs])
    assert bulyan.bulyan_select(rows, 1).tolist() == [0, 1, 2, 3, 4]
    torch.testing.assert_close(aggregate("bulyan", rows, f=1), torch.tensor([2.0, -2.0]))


def test_bulyan_keeps_the_values_closest_to_the_median_not_a_centred_window():
    """[0, 1, 2, 10, 11]: median 2, the 3 nearest are 0, 1, 2 (a trimmed mean would take
    1, 2, 10); a tie in distance ([-1, 0, 1], beta 2) keeps the smaller value, whichever
    client sent it."""
    col = torch.tensor([[0.0, -1.0], [1.0, 0.0], [2.0, 1.0], [10.0, 5.0], [11.0, 6.0]])
    torch.testing.assert_close(bulyan.closest_to_median_mean(col, 3), torch.tensor([1.0, 0.0]))
    torch.testing.assert_close(bulyan.closest_to_median_mean(col[:3, 1:], 2), torch.tensor([-0.5]))
    torch.testing.assert_close(bulyan.closest_to_median_mean(col[:3, 1:].flip(0), 2), torch.tensor([-0.5]))


def clip_upload(deltas, weights, extras=None) -> Upload:
    return Upload(delta=deltas, weight=torch.as_tensor(weights, dtype=torch.float32), extras=extras or {})


def test_norm_bounded_clips_over_all_parameters_together():
    """Client 0: ([0.3, 0], [0.4]), norm 0.5 <= 1, unchanged. Client 1: ([3, 0], [4]),
    norm 5 (its first tensor alone 3), scaled by 1/5. Weights 1 and 3; extras unclipped."""
    agg = AGGREGATORS.get("norm_bounded")(AGGREGATORS.config_class("norm_bounded")(clip_norm=1.0))
    deltas = [torch.tensor([[0.3, 0.0], [3.0, 0.0]]), torch.tensor([[0.4], [4.0]])]
    agg.add(torch.tensor([0, 1]), clip_upload(deltas, [1.0, 3.0], {"tau": [torch.tensor([100.0, 300.0])]}))
    out = agg.reduce(Comm(), [], 2, 2)
    torch.testing.assert_close(out.delta[0], torch.tensor([(0.3 + 3 * 0.6) / 4, 0.0]))
    torch.testing.assert_close(out.delta[1], torch.tensor([(0.4 + 3 * 0.8) / 4]))
    torch.testing.assert_close(out.extras["tau"][0], torch.tensor((100.0 + 900.0) / 4))
    torch.testing.assert_close(norm_bounded.client_norms(deltas), torch.tensor([0.5, 5.0]))


def test_norm_bounded_reads_a_transposed_stack_by_index():
    g = torch.Generator().manual_seed(1)
    transposed = torch.randn(3, 5, 4, generator=g).transpose(1, 2) * torch.tensor([0.01, 1.0, 10.0]).view(3, 1, 1)
    bias = torch.randn(3, 4, generator=g)
    assert not transposed.is_contiguous()
    got, want = [], []
    for stack, out in ((transposed, got), (transposed.contiguous(), want)):
        agg = AGGREGATORS.get("norm_bounded")(AGGREGATORS.config_class("norm_bounded")(clip_norm=2.0))
        agg.add(torch.tensor([0, 1, 2]), clip_upload([stack, bias], [1.0, 2.0, 3.0]))
        out.extend(agg.reduce(Comm(), [], 3, 3).delta)
    norms = (transposed.flatten(1).square().sum(1) + bias.square().sum(1)).sqrt()
    scale = (2.0 / norms).clamp(max=1.0)
    assert scale[0] == 1.0 and scale[2] < 1.0
    w = torch.tensor([1.0, 2.0, 3.0]) * scale / 6.0
    torch.testing.assert_close(got[0], (w.view(3, 1, 1) * transposed).sum(0))
    torch.testing.assert_close(got[1], (w.view(3, 1) * bias).sum(0))
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("name", ["krum", "norm_bounded"])
def test_in_the_real_round_x_plus_the_rule_applied_to_the_client_updates(name: str, fl, engine):
    """FedAvg's clients, both engines (the vectorized one hands over a chunk whose weight
    stack may be per-client transposed): Krum's chosen update (f = 1 of 5) or the
    n_k-weighted mean of the updates clipped to norm 0.2 over (W, b) together."""
    clients = fl.make_clients([3, 6, 4, 5, 7])
    cfg = fl.make_config(5, aggregator={"name": name, **({"f": 1} if name == "krum" else {"clip_norm": 0.2})})
    run = fl.run_rounds(cfg, fl.linear_model(), clients, [[0, 1, 2, 3, 4]], engine)
    x = run.history[0]
    updates = [[w - xi for w, xi in zip(fl.local_sgd(x, c, [torch.arange(c.n)], 0.3), x)] for c in clients]
    flat = torch.stack([torch.cat([t.flatten() for t in u]) for u in updates])
    if name == "krum":
        chosen = updates[int(torch.tensor(reference_scores(flat, 1)).argmin())]
        fl.assert_params_close(run.final, [xi + u for xi, u in zip(x, chosen)])
        return
    scale = (0.2 / flat.norm(dim=1)).clamp(max=1.0)
    assert (scale < 1).sum() >= 2 and (scale == 1).sum() >= 1
    w = torch.tensor([float(c.n) for c in clients]) * scale / 25.0
    fl.assert_params_close(run.final, [xi + sum(wk * u[i] for wk, u in zip(w, updates)) for i, xi in enumerate(x)])


@pytest.mark.parametrize("name", ROBUST)
def test_an_empty_share_still_reduces(name: str):
    """A rank without clients adds a chunk of zero rows; the extras stay the weighted mean."""
    settings = {"f": 0} if "krum" in name or name == "bulyan" else {}
    agg = AGGREGATORS.get(name)(AGGREGATORS.config_class(name)(**settings))
    agg.add(torch.zeros(0, dtype=torch.long), clip_upload([torch.zeros(0, 2)], torch.zeros(0), {"tau": [torch.zeros(0)]}))
    rows = torch.tensor([[2.0, 4.0], [2.0, 4.0], [2.0, 4.0]])
    agg.add(torch.tensor([4, 6, 8]), clip_upload([rows * 0.1], [3.0, 1.0, 0.0], {"tau": [torch.tensor([5.0, 1.0, 9.0])]}))
    out = agg.reduce(Comm(), [], 3, 9)
    torch.testing.assert_close(out.delta[0], torch.tensor([0.2, 0.4]))
    torch.testing.assert_close(out.extras["tau"][0], torch.tensor(4.0))
