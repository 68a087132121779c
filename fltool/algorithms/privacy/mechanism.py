"""The Gaussian mechanism on client updates: DP-FedAvg (McMahan et al. 2018), central
or local, with optional adaptive clipping (Andrew et al. 2021).

Central (a trusted server): each client's whole update is clipped to L2 norm S and
weighted 1; the server adds N(0, (z S)^2) to every coordinate of the clipped sum and
divides by the expected cohort size (q K under Poisson sampling, m = round(C K) with
fixed-size sampling): Delta = (sum_k clip(Delta_k) + N(0, z^2 S^2 I)) / E[m], a fixed
denominator, so one client's presence changes the result by at most S / E[m]. The server
optimizer then applies Delta as it would any aggregate (post-processing).

Adaptive clipping: S_{t+1} = S_t exp(-eta_C (b_t - gamma)), b_t the fraction of the
cohort whose update norm was at most S_t, released as (count + N(0, sigma_b^2)) / E[m].
The update's noise multiplier becomes z_Delta = (z^-2 - (2 sigma_b)^-2)^(-1/2), so that the
two releases together cost what one of multiplier z does (the paper's Theorem 1).

Local (an untrusted server): each client clips to S and adds N(0, (z S)^2) to its own
upload before sending it; the server aggregates as usual.

Distributed (central with `dp.noise_placement: clients`, under secagg): the same release
as central, but the noise comes from the clients. Each clips to S and adds
N(0, (z S)^2 / t) before quantising and masking, t the fewest inputs the round's secure
sum may hold (secagg's reconstruction threshold, or secagg.min_inputs if higher): the
server unmasks only a sum of at least t inputs (fewer abort the round),
so the released sum always carries noise of std >= z S, the central mechanism's, and the
accountant accounts z as for central DP. More survivors than t only add noise (the
std is z S sqrt(|U3| / t)); the server never sees the un-noised sum.

Noise comes from a generator seeded by (seed, round) (central) or (seed, round, client)
(local, distributed): reproducible, so a resumed run repeats it bit for bit, and both engines agree,
which is what research needs and a deployment must not have (anyone with the seed can
subtract it). `dp.noise_source: os` draws it from the OS CSPRNG instead (Box-Muller on
os.urandom bits), giving reproducibility up.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from fltool.algorithms.aggregators.norm_bounded import client_norms
from fltool.algorithms.api import Aggregate, Upload
from fltool.algorithms.fedavg import per_client
from fltool.algorithms.sampling import cohort_size, derive_seed
from fltool.config.schema import Config, DPConfig
from fltool.errors import FltoolError

UNCLIPPED = "dp_unclipped"  # the extra that carries each client's 1[||Delta_k|| <= S]
# distributed DP: secagg's clipping_range must hold S plus this many client-noise stds, so
# a coordinate's noise is cut with probability below 2e-9 (two-sided normal tail at 6)
NOISE_SIGMAS = 6.0


def clip_to_norm(delta: Sequence[Tensor], clip_norm: Tensor | float) -> tuple[list[Tensor], Tensor]:
    """Each client's update (all parameter stacks together) scaled by min(1, S / norm),
    and the (M,) norms before clipping; every stack keeps its memory layout."""
    norms = client_norms(delta)
    scale = (clip_norm / norms).clamp(max=1.0)  # a zero update: S / 0 = inf -> 1
    return [d * per_client(scale.to(d.dtype), d) for d in delta], norms


def os_gaussian(count: int, device: torch.device) -> Tensor:
    """`count` standard normal float32 values from the OS CSPRNG (Box-Muller on 2 x 32
    random bits per value, in float64)."""
    bits = torch.frombuffer(bytearray(os.urandom(8 * count)), dtype=torch.int32).view(2, count).to(torch.float64)
    u1 = (bits[0] + 2**31 + 0.5) / 2**32  # in (0, 1): log never sees 0
    u2 = (bits[1] + 2**31 + 0.5) / 2**32
    return (torch.sqrt(-2 * torch.log(u1)) * torch.cos(2 * math.pi * u2)).to(torch.float32).to(device)


def gaussian_like(like: Sequence[Tensor], std: float, source: str, seed: int, *keys: object) -> list[Tensor]:
    """N(0, std^2) noise shaped like `like`, one draw over all of it."""
    total = sum(t.numel() for t in like)
    device = like[0].device
    if source == "os":
        flat = os_gaussian(total, device)
    else:
        generator = torch.Generator(device=device).manual_seed(derive_seed(seed, "dp-noise", *keys))
        flat = torch.randn(total, generator=generator, device=device)
    flat = flat * std
    return [part.view_as(t).to(t.dtype) for part, t in zip(flat.split([t.numel() for t in like]), like, strict=True)]


def client_noise_std(z: float, clip_norm: float, shares: int) -> float:
    """Distributed DP: each client's noise std, so that any `shares` of them sum to z S."""
    return z * clip_norm / math.sqrt(shares)


def noise_range_problem(cfg: Config, z: float) -> str | None:
    """Distributed DP: why secagg.clipping_range could cut the clients' noise (a coordinate
    of a clipped update is at most S, its noise std z S / sqrt(t) at the fewest inputs t
    a round may unmask), or None when it holds S + NOISE_SIGMAS stds."""
    from fltool.algorithms.secagg.aggregator import fewest_inputs

    fed, faults = cfg.federated, cfg.clients
    cohort = cohort_size(fed.num_clients, fed.fraction)
    shrinks = faults.dropout > 0 or (faults.stragglers > 0 and faults.straggler_policy == "drop") or fed.sampling == "poisson"
    lo = max(2, faults.min_returned) if shrinks else cohort
    hi = fed.num_clients if fed.sampling == "poisson" else cohort
    t = fewest_inputs(cfg.secagg, range(lo, max(lo, hi) + 1))
    std = client_noise_std(z, cfg.dp.clip_norm, t)
    need = cfg.dp.clip_norm + NOISE_SIGMAS * std
    if cfg.secagg.clipping_range >= need:
        return None
    return (f"{cfg.secagg.clipping_range:g} would cut the clients' DP noise (std z S / sqrt(t) = {std:.4g} at t = {t} inputs): "
            f"it needs >= S + {NOISE_SIGMAS:g} std = {need:.4g}")


def update_noise_multiplier(z: float, count_noise: float) -> float:
    """z_Delta with adaptive clipping: (z^-2 - (2 sigma_b)^-2)^(-1/2); needs 2 sigma_b > z."""
    if z == 0:
        return 0.0
    rest = z**-2 - (2 * count_noise) ** -2
    if rest <= 0:
        raise FltoolError(f"dp.count_noise {count_noise} leaves no budget for the update: it needs 2 * count_noise > z = {z}")
    return rest**-0.5


class Privacy:
    """The DP mechanism of a run: `client_side` on every chunk's uploads, `server_side`
    on the aggregate. `state` (the adaptive clip norm) is checkpointed."""

    def __init__(self, dp: DPConfig, z: float, expected_cohort: float, seed: int, device: torch.device) -> None:
        self.dp = dp
        self.z = z
        self.expected = expected_cohort
        self.seed = seed
        self.count_noise = dp.count_noise if dp.count_noise is not None else expected_cohort / 20
        self.z_update = update_noise_multiplier(z, self.count_noise) if dp.adaptive_clipping else z
        self.state = {"clip_norm": [torch.tensor(dp.clip_norm, dtype=torch.float64, device=device)]}

    @property
    def clip_norm(self) -> Tensor:
        return self.state["clip_norm"][0]

    @property
    def distributed(self) -> bool:
        """Central DP whose noise the clients add, each a share, before secagg masks it."""
        return self.dp.mode == "central" and self.dp.noise_placement == "clients"

    def client_side(self, ids: Tensor, upload: Upload, round_: int, noise_shares: int | None = None) -> Upload:
        """Clip (and, local or distributed DP, noise) a chunk's uploads. Distributed: each
        client adds N(0, (z S)^2 / noise_shares), noise_shares the fewest inputs the
        round's secure sum can hold (`SecAggParams.fewest_inputs`)."""
        clipped, norms = clip_to_norm(upload.delta, self.clip_norm.to(torch.float32))
        if self.dp.mode == "local":
            clipped = self._per_client_noise(ids, clipped, self.z * self.dp.clip_norm, round_)
            return Upload(delta=clipped, weight=upload.weight, extras=upload.extras, state=upload.state)
        if self.distributed:
            if noise_shares is None:
                raise FltoolError("dp.noise_placement clients: the round's secagg threshold is needed to size each client's noise")
            std = client_noise_std(self.z, self.dp.clip_norm, noise_shares)
            clipped = self._per_client_noise(ids, clipped, std, round_, "distributed")
        extras = dict(upload.extras)
        if self.dp.adaptive_clipping:
            extras[UNCLIPPED] = [(norms <= self.clip_norm).to(torch.float32)]
        return Upload(delta=clipped, weight=torch.ones_like(upload.weight), extras=extras, state=upload.state)

    def _per_client_noise(self, ids: Tensor, clipped: list[Tensor], std: float, round_: int, *tag: str) -> list[Tensor]:
        """Each client's own N(0, std^2), seeded by (seed, round, client): both engines draw
        the same whatever chunk a client is in (or from the OS, `dp.noise_source: os`)."""
        noised = [gaussian_like([d[i] for d in clipped], std, self.dp.noise_source, self.seed, round_, k, *tag)
                  for i, k in enumerate(ids.tolist())]
        return [d + torch.stack([n[j] for n in noised]) for j, d in enumerate(clipped)]

    def server_side(self, aggregate: Aggregate, round_: int, comm: Any) -> Aggregate:
        """Central DP: the noised, fixed-denominator mean of the clipped updates, and the
        next clip norm; local DP: the aggregate as it is."""
        if self.dp.mode != "central":
            return aggregate
        m = aggregate.clients  # the clients the mean is over (secagg: those whose input arrived)
        if self.distributed:  # the noise is already in the sum, the clients': only the denominator
            delta = [d * m / self.expected for d in aggregate.delta]
            return Aggregate(delta=delta, extras=aggregate.extras, clients=m, num_clients=aggregate.num_clients)
        noise = self.server_noise(aggregate.delta, comm, round_)
        std = self.z_update * self.clip_norm.to(torch.float32)  # this round's S, before adapting it
        delta = [(d * m + n * std) / self.expected for d, n in zip(aggregate.delta, noise, strict=True)]
        extras = dict(aggregate.extras)
        if self.dp.adaptive_clipping:
            unclipped = extras.pop(UNCLIPPED)[0].to(torch.float64) * m
            count_noise = self.server_noise([unclipped], comm, round_, "count")[0] * self.count_noise
            fraction = (unclipped + count_noise) / self.expected
            self.clip_norm.mul_(torch.exp(-self.dp.clip_lr * (fraction - self.dp.target_quantile)))
        return Aggregate(delta=delta, extras=extras, clients=aggregate.clients, num_clients=aggregate.num_clients)

    def server_noise(self, like: Sequence[Tensor], comm: Any, *keys: object) -> list[Tensor]:
        """Unit Gaussian noise, the same on every rank under `launch`: seeded, each rank
        draws it alike; from the OS, rank 0 draws it and the others add zeros to it."""
        noise = gaussian_like(like, 1.0, self.dp.noise_source, self.seed, *keys)
        if self.dp.noise_source == "os" and comm.world_size > 1:
            if not comm.is_main:
                noise = [torch.zeros_like(n) for n in noise]
            comm.all_reduce_sum(noise)
        return noise
