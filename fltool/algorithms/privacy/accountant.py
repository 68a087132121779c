"""Epsilon for a run's DP mechanism, from Google's `dp-accounting` (RDP or PLD).

What each round is, to the accountant:
- central DP, `federated.sampling: poisson` (rate q = C): PoissonSampled(q, Gaussian(z)),
  the add-or-remove-one-client relation, the noise's std z * S against sensitivity S;
- central DP, fixed-size sampling (m = round(C K) of K): SampledWithoutReplacement(K, m,
  Gaussian(z / 2)) under replace-one-client (RDP only): replacing a client moves the
  clipped sum by up to 2S;
- local DP: each client's own Gaussian(z / 2) release, composed over every round (no
  amplification: the server sees who sent what), replace-one relation.
Imported only when a run uses DP, so the CLI starts without scipy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from functools import cache

import dp_accounting
from absl import logging as absl_logging
from dp_accounting import dp_event
from dp_accounting.pld import pld_privacy_accountant
from dp_accounting.rdp import rdp_privacy_accountant

from fltool.algorithms.sampling import cohort_size
from fltool.config.schema import DPConfig, FederatedConfig

NeighborRel = dp_accounting.NeighboringRelation
# the RDP accountant warns for every fractional order whose series it cannot sum and
# then leaves that order out, which only makes the bound it returns a little looser
absl_logging.set_verbosity(absl_logging.ERROR)


@dataclass(frozen=True)
class Mechanism:
    """What the accountant needs to know of a run: hashable, so epsilons are cached."""

    mode: str  # central | local
    accountant: str  # rdp | pld
    sampling: str  # fixed | poisson
    fraction: float
    num_clients: int

    @classmethod
    def of(cls, dp: DPConfig, fed: FederatedConfig) -> Mechanism:
        return cls(dp.mode, dp.accountant, fed.sampling, fed.fraction, fed.num_clients)


def default_delta(num_clients: int) -> float:
    """1 / K^1.1: below 1/K, so that releasing one client's data outright is not (eps, delta)-DP."""
    return 1.0 / num_clients**1.1


def round_event(mech: Mechanism, z: float) -> dp_event.DpEvent:
    if mech.mode == "local":
        return dp_event.GaussianDpEvent(z / 2)
    if mech.sampling == "poisson":
        return dp_event.PoissonSampledDpEvent(mech.fraction, dp_event.GaussianDpEvent(z))
    m = cohort_size(mech.num_clients, mech.fraction)
    return dp_event.SampledWithoutReplacementDpEvent(mech.num_clients, m, dp_event.GaussianDpEvent(z / 2))


def fresh_accountant(mech: Mechanism) -> dp_accounting.PrivacyAccountant:
    if mech.accountant == "pld":
        return pld_privacy_accountant.PLDAccountant()
    replace = mech.mode == "central" and mech.sampling == "fixed"
    return rdp_privacy_accountant.RdpAccountant(
        neighboring_relation=NeighborRel.REPLACE_ONE if replace else NeighborRel.ADD_OR_REMOVE_ONE
    )


@cache
def epsilon(mech: Mechanism, z: float, rounds: int, delta: float) -> float:
    """Epsilon at `delta` after `rounds` rounds of noise multiplier z (inf for z = 0)."""
    if rounds == 0:
        return 0.0
    if z == 0:
        return math.inf
    accountant = fresh_accountant(mech)
    accountant.compose(round_event(mech, z), rounds)
    return float(accountant.get_epsilon(delta))


def calibrate(mech: Mechanism, target_epsilon: float, rounds: int, delta: float) -> float:
    """The smallest noise multiplier whose epsilon after `rounds` rounds is at most
    `target_epsilon`: to a relative 1e-4 in z with RDP; with PLD (seconds per epsilon)
    to 1e-3, searched below the RDP answer, which bounds it (RDP's epsilon is the looser)."""
    if mech.accountant == "pld":
        rdp = calibrate(replace(mech, accountant="rdp"), target_epsilon, rounds, delta)
        if epsilon(mech, rdp, rounds, delta) <= target_epsilon:
            return _bisect(mech, target_epsilon, rounds, delta, rdp / 2, rdp, 1e-3)
    lo, hi = 0.0, 1.0
    while epsilon(mech, hi, rounds, delta) > target_epsilon:
        lo, hi = hi, hi * 2
        if hi > 1e6:
            raise ValueError(f"no noise multiplier up to 1e6 reaches epsilon {target_epsilon}")
    return _bisect(mech, target_epsilon, rounds, delta, lo, hi, 1e-4 if mech.accountant == "rdp" else 1e-3)


def _bisect(mech: Mechanism, target_epsilon: float, rounds: int, delta: float, lo: float, hi: float, tol: float) -> float:
    """Shrink [lo, hi] (epsilon(hi) <= target) to a relative `tol`; epsilon falls as z grows."""
    while hi - lo > tol * hi:
        mid = (lo + hi) / 2
        if epsilon(mech, mid, rounds, delta) > target_epsilon:
            lo = mid
        else:
            hi = mid
    return hi
