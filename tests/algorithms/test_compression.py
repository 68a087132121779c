"""Upload compressors against their definitions on hand-checkable uploads, then in real
rounds and whole runs.

qsgd (Alistarh et al. 2017): decoded_i = ||x|| sign(x_i) l_i / s, s = 2^bits - 1, l_i
stochastically rounded so that E[decoded] = x; 4 + ceil(P (bits + 1) / 8) bytes.
topk: the k = max(1, ceil(fraction P)) largest |u_i| of u = delta + residual over all
parameters; residual <- u - decoded; 8 k bytes. Randomness per (seed, round, client):
chunking, engines and resuming do not change what is sent.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from fltool.algorithms import COMPRESSORS, LocalRule
from fltool.algorithms.sampling import derive_seed
from fltool.config import config_from_dict
from fltool.config.registry import COMPRESSORS as REGISTRY
from fltool.errors import FltoolError
from fltool.run.checkpoint import load_checkpoint
from fltool.run.metrics import read_metrics
from fltool.run.rundir import create_run_dir, last_checkpoint
from fltool.trainers.federated import train_federated
from tests.conftest import train_maybe_interrupted

SEED = 7


def make(name: str, seed: int = SEED, **settings: Any):
    return COMPRESSORS.get(name)(REGISTRY.config_class(name)(name=name, **settings), seed)


def stacks(rows: list[list[float]]) -> list[torch.Tensor]:
    """A chunk of clients, each with P = 5 coordinates over two parameters (2,) and (3,)."""
    t = torch.tensor(rows)
    return [t[:, :2].clone(), t[:, 2:].clone()]


def flat(delta: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([d.reshape(d.shape[0], -1) for d in delta], dim=1)


def test_every_compressor_is_registered():
    assert set(COMPRESSORS.names()) == {"none", "qsgd", "topk"}


@pytest.mark.parametrize("bits", [1, 2, 8])
def test_qsgd_is_unbiased(bits):
    """The mean over N = 20000 draws (one per client id) is x. Each decoded coordinate
    takes one of two adjacent grid values ||x||/s apart, so its std is at most
    ||x|| / (2 s), the mean's at most ||x|| / (2 s sqrt N): 5 of those is the tolerance
    (0.017 at 1 bit), far below the bias of deterministic rounding (0.3 here at 1 bit)."""
    n, x = 20000, [0.3, -1.2, 0.5, 0.0, -0.05]
    delta = stacks([x] * n)
    decoded, rows, _ = make("qsgd", bits=bits).compress(torch.arange(n), delta, {}, 1)
    assert rows == {}
    s, norm = 2**bits - 1, torch.tensor(x).norm().item()
    mean = flat(decoded).double().mean(0)
    torch.testing.assert_close(mean, torch.tensor(x, dtype=torch.float64), rtol=0, atol=5 * norm / (2 * s * math.sqrt(n)))
    assert flat(decoded).std(0)[:3].min() > 0  # really random, not x itself


@pytest.mark.parametrize("bits", [1, 2, 8])
def test_qsgd_values_lie_on_the_grid_with_x_signs(bits):
    x = torch.tensor([[0.3, -1.2, 0.5, 0.0, -0.05], [2.0, 1.0, -3.0, 0.5, 0.25]])
    decoded, _, _ = make("qsgd", bits=bits).compress(torch.tensor([3, 4]), stacks(x.tolist()), {}, 2)
    s, norm = 2**bits - 1, x.norm(dim=1, keepdim=True)
    level = flat(decoded) * s / norm
    torch.testing.assert_close(level, level.round(), rtol=0, atol=1e-4)
    assert level.abs().max() <= s + 1e-4
    assert torch.all((torch.sign(flat(decoded)) == torch.sign(x)) | (flat(decoded) == 0))
    # each level is floor or ceil of s |x_i| / ||x||
    scaled = x.abs() * s / norm
    assert torch.all((level.abs() >= scaled.floor() - 1e-4) & (level.abs() <= scaled.ceil() + 1e-4))


def test_qsgd_keeps_a_zero_update_zero():
    decoded, _, nbytes = make("qsgd", bits=2).compress(torch.tensor([0, 1]), stacks([[0.0] * 5, [1.0, 0, 0, 0, 0]]), {}, 1)
    assert torch.equal(flat(decoded), torch.tensor([[0.0] * 5, [1.0, 0, 0, 0, 0]]))  # 1-hot: norm = |x_1|, level s
    assert nbytes.tolist() == [4 + 2, 4 + 2]  # ceil(5 * 3 / 8) = 2


def test_qsgd_bytes_and_per_client_seeding():
    """4 + ceil(P (bits + 1) / 8) a client; a client's draw depends on (seed, round,
    client), not on the chunk it comes in."""
    q = make("qsgd", bits=8)
    rows = torch.randn(4, 5, generator=torch.Generator().manual_seed(0)).tolist()
    ids = torch.tensor([5, 1, 9, 2])
    whole, _, nbytes = q.compress(ids, stacks(rows), {}, 3)
    assert nbytes.tolist() == [4.0 + math.ceil(5 * 9 / 8)] * 4
    parts = [q.compress(ids[i : i + 1], stacks(rows[i : i + 1]), {}, 3)[0] for i in range(4)]
    assert torch.equal(flat(whole), torch.cat([flat(p) for p in parts]))
    assert not torch.equal(flat(whole), flat(q.compress(ids, stacks(rows), {}, 4)[0]))  # another round
    assert not torch.equal(flat(whole), flat(make("qsgd", seed=8, bits=8).compress(ids, stacks(rows), {}, 3)[0]))


def test_topk_keeps_the_k_largest_magnitudes_across_parameters():
    topk = make("topk", fraction=0.5, error_feedback=False)  # P = 5: k = ceil(2.5) = 3
    assert topk.init_client_state([torch.zeros(2), torch.zeros(3)]) == {}
    x = [[0.1, -5.0, 3.0, 0.2, -4.0], [1.0, 2.0, -3.0, 4.0, 0.5]]
    decoded, rows, nbytes = topk.compress(torch.tensor([0, 1]), stacks(x), {}, 1)
    assert rows == {}
    assert flat(decoded).tolist() == [[0.0, -5.0, 3.0, 0.0, -4.0], [0.0, 2.0, -3.0, 4.0, 0.0]]
    assert [d.shape for d in decoded] == [(2, 2), (2, 3)]
    assert nbytes.tolist() == [24.0, 24.0]


@pytest.mark.parametrize(("fraction", "p", "k"), [(0.01, 5, 1), (0.5, 5, 3), (1.0, 5, 5), (0.07, 100, 7), (0.01, 199210, 1993)])
def test_topk_k_is_max_1_ceil_fraction_p(fraction, p, k):
    _, _, nbytes = make("topk", fraction=fraction, error_feedback=False).compress(torch.tensor([0]), [torch.ones(1, p)], {}, 1)
    assert nbytes.tolist() == [8.0 * k]


def test_error_feedback_carries_the_rest_and_preserves_the_sum():
    """Over R rounds: sum of decoded uploads + final residual = sum of deltas; the
    residual after round 1 is exactly what was not sent."""
    topk = make("topk", fraction=0.2)  # k = 1 of 5
    initial = topk.init_client_state([torch.zeros(2), torch.zeros(3)])["residual"]
    state = {"residual": [r.expand(2, *r.shape).clone() for r in initial]}
    g = torch.Generator().manual_seed(1)
    deltas = [stacks(torch.randn(2, 5, generator=g).tolist()) for _ in range(6)]
    sent = torch.zeros(2, 5)
    for r, delta in enumerate(deltas, start=1):
        decoded, state, nbytes = topk.compress(torch.tensor([3, 4]), delta, state, r)
        assert nbytes.tolist() == [8.0, 8.0] and (flat(decoded) != 0).sum(1).tolist() == [1, 1]
        if r == 1:
            torch.testing.assert_close(flat(state["residual"]), flat(delta) - flat(decoded), rtol=0, atol=0)
        sent += flat(decoded)
    total = sum(flat(d) for d in deltas)
    torch.testing.assert_close(sent + flat(state["residual"]), total, rtol=0, atol=1e-6)


@pytest.mark.parametrize(("name", "settings"), [("qsgd", {"bits": 3}), ("topk", {"fraction": 0.3})])
def test_a_per_client_transposed_layout_gives_the_same_result(name, settings):
    """The vectorized engine may hand (M, a, b) stacks stored per-client transposed."""
    comp = make(name, **settings)
    g = torch.Generator().manual_seed(2)
    dense = [torch.randn(3, 4, 2, generator=g), torch.randn(3, 2, generator=g)]
    strided = [dense[0].transpose(1, 2).contiguous().transpose(1, 2), dense[1]]
    assert not strided[0].is_contiguous()
    state = {"residual": [torch.randn(3, 4, 2, generator=g).transpose(1, 2).contiguous().transpose(1, 2), torch.randn(3, 2, generator=g)]}
    state = state if name == "topk" else {}
    ids = torch.tensor([0, 2, 1])
    a, rows_a, _ = comp.compress(ids, dense, {k: [t.contiguous() for t in v] for k, v in state.items()}, 1)
    b, rows_b, _ = comp.compress(ids, strided, state, 1)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert all(torch.equal(x, y) for k in rows_a for x, y in zip(rows_a[k], rows_b[k]))


def test_bad_settings_are_one_line_errors():
    bad = [({"name": "qsgd", "bits": 0}, "bits"), ({"name": "qsgd", "bits": 17}, "bits"), ({"name": "topk", "fraction": 0.0}, "fraction")]
    for section, message in bad:
        with pytest.raises(FltoolError, match=message):
            config_from_dict({"compression": section}, "test")


# ---- in the real round: against the written-out compressors, on both engines ---------


def reference_upload(name: str, u: torch.Tensor, seed: int, round_: int, client: int) -> torch.Tensor:
    """One client's decoded upload from its flat u, from the definitions."""
    if name == "topk":  # k = 3 of 15
        keep = u.abs().argsort(descending=True)[:3]
        return torch.zeros_like(u).index_copy(0, keep, u[keep])
    s, norm = 2**4 - 1, u.norm()
    draw = torch.rand(u.numel(), generator=torch.Generator().manual_seed(derive_seed(seed, "qsgd", round_, client)))
    return norm * u.sign() * torch.floor(u.abs() / norm * s + draw) / s


@pytest.mark.parametrize(("name", "settings"), [("qsgd", {"bits": 4}), ("topk", {"fraction": 0.2})])
def test_real_rounds_match_the_definitions_on_both_engines(fl, engine, name, settings):
    """x_{t+1} = x_t + sum_k n_k/n decoded_k, the topk residuals carried between rounds;
    the sequential and vectorized engines give the same rounds."""
    cfg = fl.make_config(3, lr=0.3)
    cfg = dataclasses.replace(cfg, compression=REGISTRY.config_class(name)(name=name, **settings))
    clients = fl.make_clients([3, 6, 4])
    cohorts = [[0, 1, 2], [1, 2], [0, 2]]
    run = fl.run_rounds(cfg, fl.linear_model(), clients, cohorts, engine)
    other = fl.run_rounds(cfg, fl.linear_model(), clients, cohorts, "vectorized" if engine == "sequential" else "sequential")
    fl.assert_params_close(run.final, other.final)
    rule, x = LocalRule(1, None, 0.3), run.history[0]
    residual = {k: torch.zeros(15) for k in range(3)}
    for t, cohort in enumerate(cohorts, start=1):
        n = sum(clients[k].n for k in cohort)
        step = torch.zeros(15)
        for k in cohort:
            w = fl.local_sgd(x, clients[k], fl.schedule(cfg, rule, t, clients[k]), 0.3)
            u = torch.cat([(wi - xi).flatten() for wi, xi in zip(w, x)]) + residual[k]
            decoded = reference_upload(name, u, cfg.seed, t, k)
            residual[k] = u - decoded if name == "topk" else residual[k]
            step += clients[k].n / n * decoded
        x = [x[0] + step[:12].view(3, 4), x[1] + step[12:]]
        fl.assert_params_close(run.history[t], x)
    if name == "topk":
        table = torch.cat([t.flatten(1) for t in run.state.compressed.tables["residual"]], dim=1)
        torch.testing.assert_close(table, torch.stack([residual[k] for k in range(3)]), rtol=1e-5, atol=1e-6)


# ---- whole runs: engines agree, resume is bitwise, bytes_up is the encoded size ------

ROUNDS = 4
COMPRESSION = {"qsgd": {"name": "qsgd", "bits": 2}, "topk": {"name": "topk", "fraction": 0.05, "error_feedback": True}}


def run_config(root: Path, engine: str, compression: dict[str, Any]):
    fed = {"num_clients": 8, "fraction": 0.5, "rounds": ROUNDS, "local_epochs": 1, "batch_size": 10, "lr": 0.05, "engine": engine}
    raw = {
        "seed": 3,
        "device": "cpu",
        "data": {"dataset": "synthetic", "partition": "iid", "synthetic": {"train_size": 160, "test_size": 40, "shape": [1, 4, 4]}},
        "model": {"name": "mlp"},
        "federated": fed,
        "compression": compression,
        "eval": {"every": ROUNDS},
        "output": {"dir": str(root), "checkpoint_every": 1},
    }
    return config_from_dict(raw, "compression")


def whole_run(root: Path, engine: str, name: str, interrupt_after: int | None = None):
    ckpt, rows, _ = train_maybe_interrupted(run_config(root, engine, COMPRESSION[name]), interrupt_after)
    return ckpt, rows


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("name", list(COMPRESSION))
def test_engines_agree_resume_is_bitwise_and_bytes_up_is_encoded(tmp_path, name):
    seq, seq_rows = whole_run(tmp_path / "seq", "sequential", name)
    vec, vec_rows = whole_run(tmp_path / "vec", "vectorized", name)
    for k in seq.model:
        torch.testing.assert_close(vec.model[k], seq.model[k], rtol=1e-4, atol=1e-5)
    resumed, rows = whole_run(tmp_path / "resumed", "vectorized", name, interrupt_after=ROUNDS // 2)
    for k in vec.model:
        assert torch.equal(resumed.model[k], vec.model[k]), k
    untimed = lambda rs: [{k: v for k, v in r.items() if k not in ("wall_s", "elapsed_s")} for r in rs]  # noqa: E731
    assert untimed(rows) == untimed(vec_rows)
    saved = vec.extra["algorithm"]
    if name == "topk":
        assert set(saved) == {"server", "clients", "optimizer", "compression"}
        for a, b in zip(resumed.extra["algorithm"]["compression"]["residual"], saved["compression"]["residual"]):
            assert torch.equal(a, b)
        assert any(bool(t.any()) for t in saved["compression"]["residual"])
    else:
        assert "compression" not in saved
    p = sum(t.numel() for t in seq.model.values())
    per_client = 8 * math.ceil(0.05 * p) if name == "topk" else 4 + math.ceil(p * 3 / 8)
    assert [r["bytes_up"] for r in seq_rows] == [per_client * r["clients"] for r in seq_rows]
    assert per_client < p * 4 / 8  # under an eighth of the dense float32 upload
