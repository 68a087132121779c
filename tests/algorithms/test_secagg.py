"""SecAgg / SecAgg+: Shamir, the crypto, the encoding, and the protocol with dropouts."""

from __future__ import annotations

import itertools
import secrets

import pytest
import torch

from fltool.algorithms.secagg import (SecAggAbort, SecAggParams, TamperedMessage, check_capacity, default_neighbours, dequantize,
                                      error_bound, neighbour_graph, quantize, run_round)
from fltool.algorithms.secagg import crypto, shamir
from fltool.algorithms.secagg.protocol import Client, Server
from fltool.errors import FltoolError

M = 2**32


# ---- Shamir ----

def test_shamir_reconstructs_from_any_t_shares() -> None:
    secret = secrets.token_bytes(32)
    shares = shamir.split(secret, [1, 2, 3, 4, 5], threshold=3)
    for subset in itertools.combinations(shares, 3):
        assert shamir.reconstruct(subset) == secret
    assert shamir.reconstruct(shares) == secret  # extra shares are harmless
    assert all(shamir.decode_share(shamir.encode_share(s)) == s for s in shares)


def test_shamir_t_minus_1_shares_are_consistent_with_every_secret() -> None:
    """Given t-1 shares, any candidate secret fits a degree < t polynomial through them: we
    build it and derive a t-th share that reconstructs the candidate."""
    secret = secrets.token_bytes(32)
    shares = shamir.split(secret, [1, 2, 3, 4], threshold=3)
    seen = shares[:2]
    for candidate in (bytes(32), b"\xff" * 32, secrets.token_bytes(32)):
        points = [(0, int.from_bytes(candidate, "big")), *seen]
        forged_third = (4, shamir.interpolate(points, at=4))
        assert shamir.reconstruct([*seen, forged_third]) == candidate
    assert shamir.interpolate(shares[:2]) != int.from_bytes(secret, "big")  # 2 real shares alone miss it


def test_shamir_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError):
        shamir.split(bytes(32), [1, 2], threshold=3)
    with pytest.raises(ValueError):
        shamir.split(bytes(32), [1, 1, 2], threshold=2)


# ---- crypto ----

def test_key_agreement_is_symmetric_and_purpose_bound() -> None:
    a, b = crypto.new_private_key(), crypto.new_private_key()
    ab = crypto.agree(a, crypto.public_bytes(b), "mask", 3, 1, 2)
    assert ab == crypto.agree(b, crypto.public_bytes(a), "mask", 3, 2, 1)
    assert ab != crypto.agree(a, crypto.public_bytes(b), "channel", 3, 1, 2)
    assert ab != crypto.agree(a, crypto.public_bytes(b), "mask", 4, 1, 2)


def test_tampered_or_redirected_ciphertext_is_rejected() -> None:
    key = secrets.token_bytes(32)
    ad = crypto.associated_data(1, 2, 0)
    ct = crypto.encrypt(key, b"share", ad)
    assert crypto.decrypt(key, ct, ad) == b"share"
    flipped = ct[:-1] + bytes([ct[-1] ^ 1])
    with pytest.raises(TamperedMessage):
        crypto.decrypt(key, flipped, ad)
    with pytest.raises(TamperedMessage):  # relayed to another receiver / round
        crypto.decrypt(key, ct, crypto.associated_data(1, 3, 0))
    with pytest.raises(TamperedMessage):
        crypto.decrypt(key, ct, crypto.associated_data(1, 2, 1))


def test_tampered_share_in_the_protocol_is_rejected() -> None:
    params = SecAggParams(neighbours=2, threshold=2)
    clients = {u: Client(u, torch.zeros(4, dtype=torch.int64), params) for u in range(3)}
    keys = {u: c.advertise() for u, c in clients.items()}
    out = clients[0].share_keys({1: keys[1], 2: keys[2]})
    clients[1].share_keys({0: keys[0], 2: keys[2]})
    bad = bytearray(out[1])
    bad[20] ^= 0x80
    with pytest.raises(TamperedMessage):
        clients[1].receive_shares({0: bytes(bad)})
    with pytest.raises(TamperedMessage):  # 0's message to 2 replayed to 1
        clients[1].receive_shares({0: out[2]})


def test_prg_is_deterministic_chunked_and_in_range() -> None:
    seed = secrets.token_bytes(32)
    whole = torch.cat([w for _, w in crypto.prg_chunks(seed, 1000, chunk=1000)])
    parts = torch.cat([w for _, w in crypto.prg_chunks(seed, 1000, chunk=64)])
    assert torch.equal(whole, parts) and whole.dtype == torch.int64
    assert int(whole.min()) >= 0 and int(whole.max()) < M
    assert whole.float().mean().item() == pytest.approx(M / 2, rel=0.1)
    acc = torch.zeros(1000, dtype=torch.int64)
    crypto.add_mask_(acc, seed, +1, chunk=100)
    crypto.add_mask_(acc, seed, -1, chunk=7)
    assert int(acc.abs().max()) == 0


# ---- encoding ----

def test_quantisation_is_unbiased_and_bounded() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.full((200_000,), 0.3)
    q = quantize(x, 8.0, 2**4, generator=g)  # coarse: step 1, 0.3 -> 8.3 levels
    assert set(q.unique().tolist()) == {8, 9}
    assert dequantize(q.sum(), len(q), 8.0, 2**4).item() / len(q) == pytest.approx(0.3, abs=5e-3)
    assert dequantize(torch.tensor(0), 1, 8.0, 2**22).item() == -8.0
    assert quantize(torch.tensor([100.0, -100.0]), 8.0, 2**22).tolist() == [2**22, 0]  # clipped


def test_quantised_sum_error_against_float_sum() -> None:
    n, c, Q = 20, 8.0, 2**22
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(5000, generator=g) * 0.05 for _ in range(n)]
    total = sum(quantize(x, c, Q, generator=g) for x in xs) % M
    err = (dequantize(total, n, c, Q) - sum(x.double() for x in xs)).abs()
    assert err.max().item() <= error_bound(n, c, Q)  # n steps of 2c/Q = 7.6e-5
    assert err.mean().item() < error_bound(n, c, Q) / 4  # errors partly cancel (unbiased)


def test_capacity_check() -> None:
    check_capacity(1023, 2**22, 32)
    with pytest.raises(FltoolError, match="does not fit"):
        check_capacity(1024, 2**22, 32)


# ---- graph ----

@pytest.mark.parametrize(("n", "k"), [(10, 4), (11, 6), (20, 5), (100, 22), (7, 6), (7, 20)])
def test_neighbour_graph_is_k_regular_and_symmetric(n: int, k: int) -> None:
    g = neighbour_graph(range(n), k)
    assert all(len(vs) == min(k, n - 1) and u not in vs for u, vs in g.items())
    assert all(u in g[v] for u, vs in g.items() for v in vs)


def test_default_neighbours_grow_like_log_n() -> None:
    assert default_neighbours(10) == 9 and default_neighbours(100) == 22 and default_neighbours(1000) == 30


# ---- protocol ----

def _vectors(n: int, p: int = 300, seed: int = 0) -> dict[int, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {u: torch.randint(0, 2**22 + 1, (p,), generator=g) for u in range(n)}


def _plain(vectors: dict[int, torch.Tensor], who: list[int]) -> torch.Tensor:
    return sum(vectors[u] for u in who) % M


@pytest.mark.parametrize(("k", "t"), [(9, 6), (4, 3)])
def test_unmasked_sum_equals_plain_quantised_sum(k: int, t: int) -> None:
    v = _vectors(10)
    result = run_round(v, SecAggParams(neighbours=k, threshold=t))
    assert result.contributors == list(range(10))
    assert torch.equal(result.total, _plain(v, list(range(10))))


@pytest.mark.parametrize("stage", ["advertise", "share_keys", "masked_input", "unmask"])
def test_up_to_n_minus_t_dropouts_at_each_stage_keep_the_sum_exact(stage: str) -> None:
    n, t = 8, 5
    v = _vectors(n)
    for d in range(n - t + 1):
        gone = set(range(1, 1 + d))
        r = run_round(v, SecAggParams(neighbours=n - 1, threshold=t), drop={stage: gone})
        expect = [u for u in range(n) if stage == "unmask" or u not in gone]
        assert r.contributors == expect and torch.equal(r.total, _plain(v, expect)), (stage, d)
    with pytest.raises(SecAggAbort, match="aborted"):
        run_round(v, SecAggParams(neighbours=n - 1, threshold=t), drop={stage: set(range(n - t + 1))})


def test_dropouts_spread_over_stages_with_secagg_plus() -> None:
    n = 12
    v = _vectors(n)
    drop = {"share_keys": {3}, "masked_input": {7}, "unmask": {10}}
    r = run_round(v, SecAggParams(neighbours=6, threshold=3), drop=drop)
    expect = [u for u in range(n) if u not in (3, 7)]
    assert r.contributors == expect and torch.equal(r.total, _plain(v, expect))


def test_transcript_reveals_no_input_and_no_key_material() -> None:
    n = 6
    v = _vectors(n, p=2000)
    params = SecAggParams(neighbours=n - 1, threshold=4)
    clients = {u: Client(u, v[u], params) for u in range(n)}
    secrets_ = [crypto.private_bytes(c._s_key) for c in clients.values()] + [crypto.private_bytes(c._c_key) for c in clients.values()]
    secrets_ += [c._b for c in clients.values()]
    r = Server(params).run(clients, drop={"masked_input": {2}})
    vectors = [p for _, _, _, p in r.transcript.messages if isinstance(p, torch.Tensor)]
    blobs = [p for _, _, _, p in r.transcript.messages if isinstance(p, bytes)]
    assert len(vectors) == n - 1
    for y in vectors:
        for u in range(n):
            assert not torch.equal(y, v[u])
            corr = torch.corrcoef(torch.stack([y.double(), v[u].double()]))[0, 1].abs().item()
            assert corr < 0.1  # 2000 samples: |r| of independent vectors ~ 0.02
    assert all(s not in b for s in secrets_ for b in blobs)
    assert torch.equal(r.total, _plain(v, [0, 1, 3, 4, 5]))


def test_bytes_per_client_are_counted() -> None:
    r = run_round(_vectors(5, p=100), SecAggParams(neighbours=4, threshold=3))
    assert all(r.transcript.up[u] > 4 * 100 + 64 for u in range(5))
    assert all(r.transcript.down[u] > 4 * 64 for u in range(5))


def test_masks_on_the_input_device_and_in_small_chunks() -> None:
    v = _vectors(5, p=1001)
    r = run_round(v, SecAggParams(neighbours=4, threshold=3, chunk=64))
    assert torch.equal(r.total, _plain(v, list(range(5))))


def test_bench_script_runs() -> None:
    """scripts/bench_secagg.py stays runnable (one small setting)."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "scripts" / "bench_secagg.py"
    out = subprocess.run([sys.executable, str(script), "--models", "2nn", "--cohorts", "10", "--dropouts", "0", "0.3", "--no-training"],
                         capture_output=True, text=True, timeout=120, check=True).stdout
    assert "secagg+" in out and "complete" in out and "none" in out and "aborted" not in out
