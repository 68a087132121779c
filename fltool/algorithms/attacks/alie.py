"""alie: "A Little Is Enough" (Baruch et al. 2019). The malicious clients upload the
same vector mu - z sigma, where mu and sigma are the coordinate-wise mean and standard
deviation of the cohort's honest updates (the attackers are assumed to know them; here
they are every cohort client's honest update, the attackers' own included). Each
coordinate stays within z standard deviations of the mean, so distance- and
median-based defences do not single it out.

z defaults to the paper's z_max: with n clients of which f are malicious,
s = floor(n/2 + 1) - f honest supporters are needed, and z_max = Phi^-1((n - s)/n).
Small cohorts with few attackers give z_max near 0 (a nearly harmless mean); set `z`.

The malicious uploads need the whole cohort's statistics, so they are held back from
the aggregator until `finish` (which all-reduces the sums under `launch`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from statistics import NormalDist
from typing import Any

import torch
from torch import Tensor

from fltool.algorithms.api import Upload
from fltool.algorithms.attacks.base import Attack
from fltool.config.registry import ATTACKS
from fltool.config.schema import NON_NEGATIVE, AttackConfig


@dataclass
class AlieConfig(AttackConfig):
    z: float | None = field(default=None, metadata=NON_NEGATIVE)  # null: the paper's z_max


def z_max(n: int, f: int) -> float:
    """Baruch et al.'s z_max for n clients, f of them malicious (probability clamped
    into (0, 1): with f >= n/2 + 1 the formula leaves no bound)."""
    s = math.floor(n / 2 + 1) - f
    return NormalDist().inv_cdf(min(max((n - s) / n, 1e-6), 1 - 1e-6))


def take_rows(upload: Upload, rows: Tensor) -> Upload:
    pick = lambda named: {k: [t[rows] for t in ts] for k, ts in named.items()}  # noqa: E731
    return Upload(delta=[d[rows] for d in upload.delta], weight=upload.weight[rows], extras=pick(upload.extras), state=pick(upload.state))


@ATTACKS.register("alie", AlieConfig)
class Alie(Attack):
    config: AlieConfig

    def start_round(self, round_: int, cohort: int, malicious: int) -> None:
        super().start_round(round_, cohort, malicious)
        self.sums: list[Tensor] = []
        self.squares: list[Tensor] = []
        self.count: Tensor | None = None
        self.held: list[tuple[Tensor, Upload]] = []

    def corrupt(self, ids: Tensor, upload: Upload, malicious: Tensor) -> tuple[Tensor, Upload]:
        sums = [d.double().sum(0) for d in upload.delta]
        squares = [d.double().square().sum(0) for d in upload.delta]
        if self.sums:
            torch._foreach_add_(self.sums, sums)
            torch._foreach_add_(self.squares, squares)
            self.count = self.count + len(ids)
        else:
            self.sums, self.squares = sums, squares
            self.count = torch.tensor(float(len(ids)), dtype=torch.float64, device=ids.device)
        bad = malicious.nonzero().flatten()  # a host sync, only under this attack
        if len(bad):
            self.held.append((ids[bad], take_rows(upload, bad)))
        honest = (~malicious).nonzero().flatten()
        return ids[honest], take_rows(upload, honest)

    def finish(self, comm: Any) -> tuple[Tensor, Upload] | None:
        comm.all_reduce_sum([*self.sums, *self.squares, self.count])
        if not self.held:
            return None
        z = z_max(self.cohort, self.malicious) if self.config.z is None else self.config.z
        mean = [s / self.count for s in self.sums]
        std = [(q / self.count - m.square()).clamp_min(0).sqrt() for q, m in zip(self.squares, mean, strict=True)]
        ids = torch.cat([i for i, _ in self.held])
        held = [u for _, u in self.held]
        crafted = [(m - z * s).float() for m, s in zip(mean, std, strict=True)]
        rows = len(ids)
        return ids, Upload(
            delta=[c.unsqueeze(0).expand(rows, *c.shape).clone() for c in crafted],
            weight=torch.cat([u.weight for u in held]),
            extras={k: [torch.cat(parts) for parts in zip(*(u.extras[k] for u in held), strict=True)] for k in held[0].extras},
        )
