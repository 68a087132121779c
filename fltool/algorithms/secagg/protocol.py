"""SecAgg / SecAgg+ in one process: Client and Server objects and the four stages.

Stages (Bonawitz et al. 2017, with Bell et al. 2020's neighbour graph):
  0 advertise     each client sends two X25519 public keys (channel c_pk, mask s_pk);
                  the server forwards each client its neighbours' keys.
  1 share_keys    each client Shamir-shares its mask private key s_sk and a fresh
                  self-mask seed b among its neighbours and itself (threshold t), and
                  sends each neighbour's shares AES-GCM-encrypted through the server.
  2 masked_input  y_u = x_u + PRG(b_u) + sum_{v in live N(u)} sign(u, v) PRG(s_uv)
                  mod 2^bits, with sign +1 for u < v and -1 for u > v: pairwise masks
                  cancel in the sum of any set containing both ends.
  3 unmasking     the server announces who sent y (U3); each responding neighbour reveals,
                  per neighbour u, b_u's share if u is in U3 and s_sk_u's otherwise (never
                  both). The server removes the self masks of U3 and the pairwise masks
                  that U3's members shared with clients that dropped after stage 1.
A client that drops at any stage is just absent from the later ones; a round where some
client has fewer than t live shareholders, or fewer than t inputs arrive, aborts with
`SecAggAbort`. Every client-to-client byte passes through `Server.relay`, which records
it in the transcript: that record is what an honest-but-curious server learns.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor

from fltool.algorithms.secagg import crypto, shamir
from fltool.algorithms.secagg.encoding import reduce_mod
from fltool.algorithms.secagg.graph import neighbour_graph
from fltool.errors import RoundAborted

STAGES = ("advertise", "share_keys", "masked_input", "unmask")
SERVER = -1


class SecAggAbort(RoundAborted):
    """Too few clients survived a stage to finish the round without revealing anyone
    (a `RoundAborted`, which the trainer catches without importing this package)."""


@dataclass(frozen=True)
class SecAggParams:
    neighbours: int  # k; >= n - 1 gives the complete graph (the original SecAgg)
    threshold: int  # t: shares needed to reconstruct a secret, inputs needed to unmask
    modulus_bits: int = 32
    round_id: int = 0
    chunk: int = crypto.CHUNK
    min_inputs: int = 0  # the server unmasks no sum of fewer inputs than this (nor than t)

    @property
    def fewest_inputs(self) -> int:
        """The fewest inputs an unmasked sum can hold: what distributed DP's noise is sized by."""
        return max(self.threshold, self.min_inputs)


@dataclass
class Transcript:
    """Everything the server sees, and the bytes each client sends and receives."""

    keep_vectors: bool = True  # False: count the masked vectors' bytes, keep no copy (benchmarks)
    messages: list[tuple[str, int, int, bytes | Tensor | None]] = field(default_factory=list)
    up: dict[int, int] = field(default_factory=dict)
    down: dict[int, int] = field(default_factory=dict)

    def record(self, stage: str, sender: int, receiver: int, payload: bytes | Tensor, size: int) -> None:
        if isinstance(payload, Tensor) and not self.keep_vectors:
            payload = None  # type: ignore[assignment]
        self.messages.append((stage, sender, receiver, payload))
        if sender != SERVER:
            self.up[sender] = self.up.get(sender, 0) + size
        if receiver != SERVER:
            self.down[receiver] = self.down.get(receiver, 0) + size


class Client:
    """One client's state for one round; its secrets never leave it unencrypted."""

    def __init__(self, cid: int, vector: Tensor | Callable[[], Tensor], params: SecAggParams) -> None:
        self.cid, self.params, self._vector = cid, params, vector
        self._c_key, self._s_key = crypto.new_private_key(), crypto.new_private_key()
        self._b = os.urandom(32)
        self._keys: dict[int, tuple[bytes, bytes]] = {}
        self._held: dict[int, tuple[shamir.Share, shamir.Share]] = {}  # owner -> (s_sk share, b share)

    def advertise(self) -> bytes:
        return crypto.public_bytes(self._c_key) + crypto.public_bytes(self._s_key)

    def _channel(self, peer: int) -> bytes:
        return crypto.agree(self._c_key, self._keys[peer][0], "channel", self.params.round_id, self.cid, peer)

    def share_keys(self, neighbour_keys: Mapping[int, bytes]) -> dict[int, bytes]:
        """Encrypted shares for each neighbour (own shares kept)."""
        self._keys = {v: (pk[:32], pk[32:]) for v, pk in neighbour_keys.items()}
        holders = sorted([*self._keys, self.cid])
        xs = [v + 1 for v in holders]
        s_shares = shamir.split(crypto.private_bytes(self._s_key), xs, self.params.threshold)
        b_shares = shamir.split(self._b, xs, self.params.threshold)
        out = {}
        for v, s, b in zip(holders, s_shares, b_shares):
            if v == self.cid:
                self._held[v] = (s, b)
                continue
            plain = self.cid.to_bytes(4, "big") + v.to_bytes(4, "big") + shamir.encode_share(s) + shamir.encode_share(b)
            out[v] = crypto.encrypt(self._channel(v), plain, crypto.associated_data(self.cid, v, self.params.round_id))
        return out

    def receive_shares(self, ciphertexts: Mapping[int, bytes]) -> None:
        for u, message in ciphertexts.items():
            plain = crypto.decrypt(self._channel(u), message, crypto.associated_data(u, self.cid, self.params.round_id))
            if int.from_bytes(plain[:4], "big") != u or int.from_bytes(plain[4:8], "big") != self.cid:
                raise crypto.TamperedMessage("secagg: a share names the wrong sender or receiver")
            n = shamir.SHARE_BYTES
            self._held[u] = (shamir.decode_share(plain[8:8 + n]), shamir.decode_share(plain[8 + n:]))

    def masked_input(self) -> Tensor:
        """y = x + PRG(b) + pairwise masks with the neighbours whose shares arrived."""
        x = self._vector() if callable(self._vector) else self._vector
        y = x.to(torch.int64).clone()
        crypto.add_mask_(y, self._b, +1, self.params.chunk)
        for v in sorted(set(self._held) - {self.cid}):
            seed = crypto.agree(self._s_key, self._keys[v][1], "mask", self.params.round_id, self.cid, v)
            crypto.add_mask_(y, seed, +1 if self.cid < v else -1, self.params.chunk)
        return reduce_mod(y, self.params.modulus_bits)

    def unmask(self, survivors: set[int]) -> dict[int, tuple[str, bytes]]:
        """Per owner: ("b", share) if it sent its input, else ("s", share); one kind per owner."""
        return {u: ("b", shamir.encode_share(b)) if u in survivors else ("s", shamir.encode_share(s))
                for u, (s, b) in self._held.items()}


@dataclass
class RoundResult:
    total: Tensor  # sum of the contributors' vectors mod 2^bits (int64)
    contributors: list[int]  # U3: whose inputs the total holds
    transcript: Transcript
    client_seconds: dict[int, float]
    server_seconds: float


class Server:
    """Relays, records, sums, and unmasks. Honest-but-curious: follows the protocol."""

    def __init__(self, params: SecAggParams, keep_vectors: bool = True) -> None:
        self.params = params
        self.transcript = Transcript(keep_vectors)
        self.client_seconds: dict[int, float] = {}

    def relay(self, stage: str, sender: int, receiver: int, payload: bytes | Tensor) -> bytes | Tensor:
        size = 4 * payload.numel() if isinstance(payload, Tensor) else len(payload)  # y travels as uint32
        self.transcript.record(stage, sender, receiver, payload, size)
        return payload

    def _call(self, cid: int, fn: Callable, *args):  # type: ignore[no-untyped-def]
        start = time.perf_counter()
        out = fn(*args)
        self.client_seconds[cid] = self.client_seconds.get(cid, 0.0) + time.perf_counter() - start
        return out

    def _require(self, alive: set[int], graph: dict[int, set[int]], who: set[int], stage: str) -> None:
        t = self.params.threshold
        for u in sorted(who):
            if len(graph[u] & alive) + (u in alive) < t:
                raise SecAggAbort(f"secagg: round aborted at {stage}: client {u} has fewer than {t} live shareholders")

    def run(self, clients: Mapping[int, Client], drop: Mapping[str, set[int]] | None = None) -> RoundResult:
        """The four stages; `drop[stage]` are clients that vanish before finishing it."""
        start = time.perf_counter()
        drop = drop or {}
        ids = sorted(clients)
        graph = neighbour_graph(ids, self.params.neighbours)
        u1 = set(ids) - drop.get("advertise", set())
        keys = {u: self.relay("advertise", u, SERVER, self._call(u, clients[u].advertise)) for u in sorted(u1)}
        self._require(u1, graph, u1, "advertise")
        u2 = u1 - drop.get("share_keys", set())
        inbox: dict[int, dict[int, bytes]] = {v: {} for v in u2}
        for u in sorted(u2):
            nk = {v: keys[v] for v in sorted(graph[u] & u1)}
            self.relay("advertise", SERVER, u, b"".join(nk.values()))
            for v, ct in self._call(u, clients[u].share_keys, nk).items():
                if v in u2:
                    inbox[v][u] = self.relay("share_keys", u, v, ct)
        for v in sorted(u2):
            self._call(v, clients[v].receive_shares, inbox[v])
        self._require(u2, graph, u2, "share_keys")
        u3 = u2 - drop.get("masked_input", set())
        total: Tensor | None = None
        for u in sorted(u3):
            y = self.relay("masked_input", u, SERVER, self._call(u, clients[u].masked_input))
            total = y.clone() if total is None else total.add_(y)
        if len(u3) < self.params.fewest_inputs or total is None:  # (clients would refuse to reveal shares for it)
            raise SecAggAbort(f"secagg: round aborted at masked_input: {len(u3)} inputs < the fewest allowed, {self.params.fewest_inputs}")
        u4 = u3 - drop.get("unmask", set())
        announce = b"".join(u.to_bytes(4, "big") for u in sorted(u3))
        revealed: dict[int, list[tuple[str, shamir.Share]]] = {u: [] for u in u2}
        for v in sorted(u4):
            self.relay("unmask", SERVER, v, announce)
            for u, (kind, share) in self._call(v, clients[v].unmask, u3).items():
                self.relay("unmask", v, SERVER, kind.encode() + share)
                revealed[u].append((kind, shamir.decode_share(share)))
        self._require(u4, graph, u2, "unmask")
        total = self._unmask(total, revealed, u2, u3, graph, keys)
        seconds = time.perf_counter() - start - sum(self.client_seconds.values())
        return RoundResult(total, sorted(u3), self.transcript, dict(self.client_seconds), seconds)

    def _unmask(self, total: Tensor, revealed: dict[int, list[tuple[str, shamir.Share]]], u2: set[int], u3: set[int],
                graph: dict[int, set[int]], keys: Mapping[int, bytes]) -> Tensor:
        t, rid, chunk = self.params.threshold, self.params.round_id, self.params.chunk
        for u in sorted(u2):
            want = "b" if u in u3 else "s"
            shares = [s for kind, s in revealed[u] if kind == want][:t]
            if len(shares) < t:
                raise SecAggAbort(f"secagg: round aborted at unmask: {len(shares)} shares of client {u}'s secret < {t}")
            secret = shamir.reconstruct(shares)
            if u in u3:
                crypto.add_mask_(total, secret, -1, chunk)
                continue
            s_key = crypto.load_private(secret)
            if crypto.public_bytes(s_key) != keys[u][32:]:
                raise SecAggAbort(f"secagg: round aborted at unmask: client {u}'s reconstructed key does not match its public key")
            for v in sorted(graph[u] & u3):  # v masked with u (u was in U2): remove v's term
                seed = crypto.agree(s_key, keys[v][32:], "mask", rid, u, v)
                crypto.add_mask_(total, seed, -1 if v < u else +1, chunk)
        return reduce_mod(total, self.params.modulus_bits)


def run_round(vectors: Mapping[int, Tensor | Callable[[], Tensor]], params: SecAggParams,
              drop: Mapping[str, set[int]] | None = None, keep_vectors: bool = True) -> RoundResult:
    """One secure-aggregation round over `vectors` (int64 encodings, one per client id)."""
    clients = {u: Client(u, x, params) for u, x in vectors.items()}
    return Server(params, keep_vectors).run(clients, drop)
