"""SecureMeanAggregator: the mean aggregator's result, computed through SecAgg(+).

Each chunk's uploads are flattened per client into one vector (delta, then the extras
such as SCAFFOLD's control-variate deltas or FedNova's step counts, so every sum the
algorithm needs goes through the protocol). At reduce time each client's vector is
multiplied by its relative weight r_k = w_k m / W (mean 1, so clipping to
[-clipping_range, clipping_range] bites no more than on the raw update), clipped,
quantised, and masked; the server unmasks only sum_k r_k x_k over the clients whose
masked input arrived (U3), and divides: sum_{U3} w_k x_k / W_U3, a weighted mean.

The weights w_k (example counts) are treated as public, as in Flower's SecAgg+; the
protocol hides the update vectors. Randomness: keys, seeds and the neighbour graph come
from the OS; the stochastic rounding and the simulated protocol dropouts (per round and
cohort) from the experiment seed, so runs repeat exactly (the masks cancel exactly),
unless a round aborts for want of live shareholders, which depends on the OS's graph.

Under `fltool launch` the ranks all-gather their clients' rows and rank 0 alone runs the
protocol, then sends U3 and the unmasked sum (or the abort) to the others.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from fltool.algorithms.api import Aggregate, Upload
from fltool.algorithms.sampling import generator_for
from fltool.algorithms.secagg.encoding import check_capacity, dequantize, quantize
from fltool.algorithms.secagg.graph import default_neighbours
from fltool.algorithms.secagg.protocol import RoundResult, SecAggAbort, SecAggParams, run_round
from fltool.config.schema import SecAggConfig

ABORT_BYTES = 512  # an abort's one line, sent from rank 0 to the others under `launch`


def neighbours_and_threshold(cfg: SecAggConfig, cohort: int) -> tuple[int, int]:
    """k and t for a cohort: the configured ones, or k ~ 3 log2(n) and t = (k + 1) / 3."""
    k = cohort - 1 if cfg.graph == "complete" else min(cfg.num_shares or default_neighbours(cohort), cohort - 1)
    if k % 2 == 1 and cohort % 2 == 1 and k < cohort - 1:
        k += 1  # an odd-degree regular graph needs an even cohort
    return k, cfg.reconstruction_threshold or max(2, math.ceil((k + 1) / 3))


def fewest_inputs(cfg: SecAggConfig, cohorts: range) -> int:
    """The fewest inputs a secure sum over a cohort size in `cohorts` can hold: t or
    secagg.min_inputs, whichever is more (distributed DP's noise check uses it)."""
    return min(max(neighbours_and_threshold(cfg, n)[1], cfg.min_inputs or 0) for n in cohorts)


def protocol_params(cfg: SecAggConfig, cohort: int, round_id: int) -> SecAggParams:
    """The round's protocol parameters; a cohort too small for its threshold aborts."""
    k, t = neighbours_and_threshold(cfg, cohort)
    if t > k + 1:  # a small cohort (after dropouts): the round cannot run without revealing someone
        raise SecAggAbort(f"secagg: {cohort} clients give each client {k + 1} shareholders, fewer than the threshold {t}")
    if (cfg.min_inputs or 0) > cohort:
        raise SecAggAbort(f"secagg: {cohort} clients cannot reach secagg.min_inputs {cfg.min_inputs}")
    return SecAggParams(neighbours=k, threshold=t, modulus_bits=cfg.modulus_bits, round_id=round_id, min_inputs=cfg.min_inputs or 0)


class SecureMeanAggregator:
    """Collects the cohort's uploads, runs one SecAgg(+) round at `reduce`."""

    def __init__(self, cfg: SecAggConfig, seed: int, round_: int) -> None:
        self.cfg, self.seed, self.round = cfg, seed, round_
        self.ids: list[Tensor] = []
        self.weights: list[Tensor] = []
        self.rows: list[Tensor] = []
        self.layout: list[tuple[str, list[torch.Size]]] = []
        self.last: RoundResult | None = None
        self.clipped = 0

    def add(self, ids: Tensor, upload: Upload) -> None:
        parts = {"delta": upload.delta, **{f"extra.{k}": v for k, v in sorted(upload.extras.items())}}
        self.layout = [(name, [t.shape[1:] for t in ts]) for name, ts in parts.items()]
        self.ids.append(ids)
        self.weights.append(upload.weight)
        self.rows.append(torch.cat([t.reshape(t.shape[0], -1).float() for ts in parts.values() for t in ts], dim=1))

    def reduce(self, comm: Any, also: Sequence[Tensor], clients: int, num_clients: int) -> Aggregate:
        comm.all_reduce_sum(list(also))
        ids_t, weights, rows = torch.cat(self.ids), torch.cat(self.weights).double(), torch.cat(self.rows)
        if comm.world_size > 1:  # `launch`: every rank's clients (float64 rows: float32 values exactly)
            ids_t, weights, rows = comm.all_gather_rows([ids_t, weights, rows])
        order = ids_t.argsort()  # clients in id order, however engines and ranks split them: coins and drops alike
        ids, weights, rows = ids_t[order].tolist(), weights[order], rows[order]
        m = len(ids)
        check_capacity(m, self.cfg.quantization_range, self.cfg.modulus_bits)
        params = protocol_params(self.cfg, m, self.round)
        u3, reduced = self._secure_sum(comm, ids, weights, rows, params)
        total = dequantize(reduced, len(u3), self.cfg.clipping_range, self.cfg.quantization_range)
        w_u3 = sum(float(weights[i]) for i, cid in enumerate(ids) if cid in u3)
        mean = (total * (float(weights.sum()) / (m * w_u3))).to(rows.dtype)
        out, at = {}, 0
        for name, shapes in self.layout:
            out[name] = []
            for shape in shapes:
                size = math.prod(shape)
                out[name].append(mean[at:at + size].view(shape))
                at += size
        extras = {k.removeprefix("extra."): v for k, v in out.items() if k.startswith("extra.")}
        # clients: those the mean is over (U3), so a fixed-denominator DP release or SCAFFOLD's
        # share |S|/K counts only the inputs that arrived
        return Aggregate(delta=out["delta"], extras=extras, clients=len(u3), num_clients=num_clients)

    def _secure_sum(self, comm: Any, ids: list[int], weights: Tensor, rows: Tensor, params: SecAggParams) -> tuple[set[int], Tensor]:
        """U3 and the unmasked integer sum. The protocol runs once, on rank 0: its keys and
        graph come from the OS, so ranks running it apart could disagree on an abort. The
        other ranks receive U3 and the sum (exact integers), or the abort."""
        abort: SecAggAbort | None = None
        if comm.is_main:
            try:
                self.last = self._protocol(ids, weights, rows, params)
            except SecAggAbort as error:
                abort = error
        if comm.world_size == 1:
            if abort is not None:
                raise abort
            assert self.last is not None
            return set(self.last.contributors), self.last.total
        # header: [aborted, U3 mask over ids, the abort's message as bytes]
        header = torch.zeros(1 + len(ids) + ABORT_BYTES, dtype=torch.int64, device=rows.device)
        if comm.is_main:
            header[0] = abort is not None
            if abort is None:
                header[1 : 1 + len(ids)] = torch.tensor([cid in self.last.contributors for cid in ids])
            else:
                text = str(abort).encode()[:ABORT_BYTES]
                header[1 + len(ids) : 1 + len(ids) + len(text)] = torch.tensor(list(text))
        comm.broadcast(header, src=0)
        if header[0]:
            text = bytes(int(b) for b in header[1 + len(ids):].tolist() if b)
            raise abort or SecAggAbort(text.decode(errors="replace"))
        total = self.last.total if comm.is_main else torch.zeros(rows.shape[1], dtype=torch.int64, device=rows.device)
        comm.broadcast(total, src=0)
        return {cid for cid, inside in zip(ids, header[1 : 1 + len(ids)].tolist(), strict=True) if inside}, total

    def _protocol(self, ids: list[int], weights: Tensor, rows: Tensor, params: SecAggParams) -> RoundResult:
        """Encode each client's weighted row, drop the simulated dropouts, run the round."""
        m = len(ids)
        relative = weights * (m / weights.sum())
        coins = generator_for(self.seed, "secagg-rounding", self.round)
        encoded, self.clipped = {}, 0
        for i, cid in enumerate(ids):  # one client's float64 row at a time: memory stays one row
            scaled = relative[i] * rows[i].double()
            # a simulation diagnostic, not something the server learns: coordinates the range cut
            self.clipped += int((scaled.abs() > self.cfg.clipping_range).sum())
            encoded[cid] = quantize(scaled, self.cfg.clipping_range, self.cfg.quantization_range, coins)
        # seeded by the round and its cohort: a resumed round repeats them, a cohort drawn
        # again after an abort (clients.on_too_few resample) runs a fresh protocol, fresh dropouts
        u = torch.rand(m, generator=generator_for(self.seed, "secagg-dropout", self.round, tuple(ids))).tolist()
        gone = {cid for cid, draw in zip(ids, u, strict=True) if draw < self.cfg.dropout}
        return run_round(encoded, params, drop={"masked_input": gone}, keep_vectors=False)

    def metrics(self) -> dict[str, Any]:
        """The round's protocol columns for metrics.jsonl: who was unmasked, who dropped
        after sharing keys, bytes per client that finished, and the time it took."""
        r = self.last
        if r is None:
            return {}
        done = r.contributors
        dropped = sorted(set(r.transcript.up) - set(done))
        return {
            "secagg_contributors": len(done),
            "secagg_dropped_ids": dropped,
            "secagg_bytes_up_per_client": round(sum(r.transcript.up[u] for u in done) / len(done)),
            "secagg_bytes_down_per_client": round(sum(r.transcript.down[u] for u in done) / len(done)),
            "secagg_client_s": sum(r.client_seconds.values()),
            "secagg_server_s": r.server_seconds,
            "secagg_clipped": self.clipped,
        }

    @property
    def bytes_up(self) -> int:
        """What the cohort sent through the server: keys, encrypted shares, masked vectors, revealed shares."""
        return 0 if self.last is None else sum(self.last.transcript.up.values())
