"""A DP run's budget, as the trainer and the runner see it: the noise multiplier
(given, or calibrated to dp.target_epsilon over federated.rounds), epsilon after each
round, and whether the next round would overspend dp.max_epsilon."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fltool.config import Config
from fltool.errors import FltoolError


@dataclass(frozen=True)
class Budget:
    noise_multiplier: float
    delta: float
    calibrated: bool
    cfg_key: Any  # the accountant's Mechanism

    def epsilon(self, rounds: int) -> float:
        from fltool.algorithms.privacy.accountant import epsilon

        return epsilon(self.cfg_key, self.noise_multiplier, rounds, self.delta)


def budget_for(cfg: Config) -> Budget | None:
    """None without DP. Calibration is deterministic: every rank and every resume of
    the run arrives at the same noise multiplier."""
    dp = cfg.dp
    if dp.mode == "none":
        return None
    from fltool.algorithms.privacy.accountant import Mechanism, calibrate, default_delta

    mech = Mechanism.of(dp, cfg.federated)
    delta = dp.delta if dp.delta is not None else default_delta(cfg.federated.num_clients)
    if dp.accountant == "pld":
        check_pld_range(cfg, mech, delta)
    if dp.noise_multiplier is not None:
        budget = Budget(dp.noise_multiplier, delta, False, mech)
    else:
        budget = Budget(calibrate(mech, dp.target_epsilon, cfg.federated.rounds, delta), delta, True, mech)
    if dp.max_epsilon is not None and budget.epsilon(1) > dp.max_epsilon:
        raise FltoolError(
            f"dp.max_epsilon: {dp.max_epsilon:g} is below the epsilon of a single round, {budget.epsilon(1):.4g} "
            f"(noise multiplier {budget.noise_multiplier:.4g}): no round could run"
        )
    if dp.noise_placement == "clients" and budget.calibrated:  # (a given z was checked at load)
        from fltool.algorithms.privacy.mechanism import noise_range_problem

        problem = noise_range_problem(cfg, budget.noise_multiplier)
        if problem:
            raise FltoolError(f"secagg.clipping_range: {problem}")
    return budget


# PLD discretises the privacy loss on a fixed grid, so its memory grows with the loss
# (this project's VM: RDP epsilon 295 took PLD 1.9 GB; 721 ran out of 6 GB). No
# guarantee means anything this far up; RDP still accounts for it in milliseconds.
PLD_MAX_EPSILON = 100.0


def check_pld_range(cfg: Config, mech: Any, delta: float) -> None:
    """Refuse, before it fills memory, a PLD accounting whose epsilon is past
    PLD_MAX_EPSILON (measured by RDP, an upper bound on PLD's)."""
    from dataclasses import replace

    from fltool.algorithms.privacy.accountant import epsilon

    dp, rounds = cfg.dp, cfg.federated.rounds
    advice = f"the PLD accountant's grid grows with epsilon (gigabytes past a few hundred) and is refused above {PLD_MAX_EPSILON:g}"
    if dp.target_epsilon is not None:
        if dp.target_epsilon > PLD_MAX_EPSILON:
            raise FltoolError(f"dp.target_epsilon: {dp.target_epsilon:g}: {advice}; use dp.accountant rdp")
        return
    if not dp.noise_multiplier:  # z = 0: epsilon is infinite, and no accountant runs
        return
    spent = epsilon(replace(mech, accountant="rdp"), dp.noise_multiplier, rounds, delta)
    if spent > PLD_MAX_EPSILON:
        raise FltoolError(
            f"dp.noise_multiplier: z = {dp.noise_multiplier:g} spends epsilon {spent:.4g} over {rounds} rounds (by RDP); "
            f"{advice}: raise z, or use dp.accountant rdp"
        )


def describe(cfg: Config, budget: Budget) -> str:
    """The line a run prints before training."""
    dp, fed = cfg.dp, cfg.federated
    how = (
        f"calibrated for epsilon {dp.target_epsilon:g} over {fed.rounds} rounds"
        if budget.calibrated
        else f"epsilon {budget.epsilon(fed.rounds):.4g} over {fed.rounds} rounds"
    )
    sampling = "Poisson sampling, rate q = C" if fed.sampling == "poisson" else "fixed-size sampling (replace-one accounting)"
    where = ", noise added by the clients (distributed, under secagg)" if dp.noise_placement == "clients" else ""
    return (
        f"dp: {dp.mode}{where}, noise multiplier {budget.noise_multiplier:.4f} ({how}) at delta {budget.delta:.3g}; "
        f"clip norm {dp.clip_norm:g}{' (adaptive)' if dp.adaptive_clipping else ''}; {sampling}; {dp.accountant} accountant"
    )
