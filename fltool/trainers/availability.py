"""Who takes part in a round, and how: sampling, dropouts, stragglers, attackers.

Every draw of round r comes from a generator seeded by (seed, what, r, attempt) and
is indexed by client id, so a rerun, a resumed run, every rank under `launch` and
every engine see the same plan. Attempt 0 is the plain sampling of a run without
faults, so enabling none of them changes nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from fltool.algorithms.local import steps_per_epoch
from fltool.algorithms.sampling import generator_for, poisson_sample, sample_clients
from fltool.config import Config
from fltool.errors import FltoolError

MAX_ATTEMPTS = 100  # resampling a round whose survivors are too few


@dataclass
class RoundPlan:
    sampled: list[int]  # the cohort drawn
    returned: list[int]  # clients whose update reaches the aggregator, ascending
    dropped: list[int] = field(default_factory=list)  # never returned
    stragglers: dict[int, int] = field(default_factory=dict)  # id -> local steps it completes
    malicious: list[int] = field(default_factory=list)  # malicious clients among `returned`
    attempts: int = 1
    skipped: bool = False  # too few returned and clients.on_too_few is skip


def malicious_for_run(cfg: Config) -> list[int]:
    """attack.per run: a fixed round(fraction * K) clients, drawn once."""
    if cfg.attack.name == "none" or cfg.attack.per != "run":
        return []
    k = cfg.federated.num_clients
    count = round(cfg.attack.fraction * k)
    return sorted(torch.randperm(k, generator=generator_for(cfg.seed, "malicious"))[:count].tolist())


def plan_round(cfg: Config, sizes: list[int], round_: int, run_malicious: list[int], first_attempt: int = 0) -> RoundPlan:
    """Draw round `round_`'s cohort and its faults; `sizes` are every client's n_k.
    `first_attempt`: the draw to start from (a redraw after a secagg abort)."""
    for attempt in range(first_attempt, MAX_ATTEMPTS):
        plan = draw(cfg, sizes, round_, attempt, run_malicious)
        if len(plan.returned) >= cfg.clients.min_returned:
            return plan
        # a Poisson cohort is never drawn again: DP's accountant assumes each client is in
        # it with probability q, whatever the others did
        if cfg.clients.on_too_few == "skip" or cfg.federated.sampling == "poisson":
            plan.skipped = True
            return plan
    raise FltoolError(
        f"round {round_}: fewer than clients.min_returned={cfg.clients.min_returned} clients returned in "
        f"{MAX_ATTEMPTS} draws; lower clients.dropout or clients.min_returned"
    )


def redraw_after_abort(cfg: Config, plan: RoundPlan, sizes: list[int], round_: int, run_malicious: list[int]) -> RoundPlan | None:
    """After a secagg round aborted (too few live shareholders or inputs): the round's
    next draw, as `clients.on_too_few: resample` asks (the model is unchanged, so the new
    cohort trains from it), or None to skip the round: with `skip`, and with Poisson
    sampling, whose cohorts are never drawn again (as in `plan_round`). After
    MAX_ATTEMPTS draws in all, the run fails."""
    if cfg.clients.on_too_few == "skip" or cfg.federated.sampling == "poisson":
        return None
    if plan.attempts >= MAX_ATTEMPTS:
        raise FltoolError(f"round {round_}: secure aggregation aborted in all {MAX_ATTEMPTS} draws; lower the dropouts or secagg's threshold")
    return plan_round(cfg, sizes, round_, run_malicious, first_attempt=plan.attempts)


def draw(cfg: Config, sizes: list[int], round_: int, attempt: int, run_malicious: list[int]) -> RoundPlan:
    fed, faults = cfg.federated, cfg.clients
    keys = (round_,) if attempt == 0 else (round_, attempt)

    def gen(what: str) -> torch.Generator:
        return generator_for(cfg.seed, what, *keys)

    k = len(sizes)
    if fed.sampling == "poisson":
        sampled = poisson_sample(k, fed.fraction, gen("sample"))
    else:
        sampled = sample_clients(k, fed.fraction, gen("sample"))
    dropped: list[int] = []
    if faults.dropout > 0:
        u = torch.rand(k, generator=gen("dropout"))
        dropped = [c for c in sampled if u[c] < faults.dropout]
    stragglers = draw_stragglers(cfg, sizes, sampled, gen) if faults.stragglers > 0 else {}
    gone = set(dropped) | (set(stragglers) if faults.straggler_policy == "drop" else set())
    returned = [c for c in sampled if c not in gone]
    if cfg.attack.name == "none":
        malicious = []
    elif cfg.attack.per == "run":
        malicious = sorted(set(run_malicious) & set(returned))
    else:
        order = torch.randperm(len(sampled), generator=gen("malicious"))[: round(cfg.attack.fraction * len(sampled))]
        malicious = sorted(c for c in (sampled[i] for i in order.tolist()) if c in returned)
    return RoundPlan(sampled, returned, dropped, stragglers, malicious, attempts=attempt + 1)


def draw_stragglers(cfg: Config, sizes: list[int], sampled: list[int], gen: Callable[[str], torch.Generator]) -> dict[int, int]:
    """round(s * m) of the cohort, each with a uniform share of the local work: epochs
    in [1, E] (Li et al. 2020) or steps in [1, E * steps per epoch]."""
    fed, faults = cfg.federated, cfg.clients
    count = round(faults.stragglers * len(sampled))
    if count == 0:
        return {}
    chosen = sorted(sampled[i] for i in torch.randperm(len(sampled), generator=gen("stragglers"))[:count].tolist())
    u = torch.rand(len(sizes), generator=gen("straggler-work"))
    out = {}
    for c in chosen:
        per_epoch = steps_per_epoch(sizes[c], fed.batch_size)
        if faults.straggler_work == "epochs":
            out[c] = (1 + int(u[c] * fed.local_epochs)) * per_epoch
        else:
            out[c] = 1 + int(u[c] * fed.local_epochs * per_epoch)
    return out
