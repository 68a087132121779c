"""scaling: a malicious client boosts its update by a factor gamma. Bagdasaryan et al.
2020's model replacement scales by gamma = n / eta (cohort size over the server lr) so
that the attacker's model replaces the global one; `factor: null` takes gamma = n,
the cohort size, which is that rule at eta = 1."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor

from fltool.algorithms.api import Upload
from fltool.algorithms.attacks.base import Attack, replace_rows, with_delta
from fltool.config.registry import ATTACKS
from fltool.config.schema import POSITIVE, AttackConfig


@dataclass
class ScalingConfig(AttackConfig):
    factor: float | None = field(default=None, metadata=POSITIVE)


@ATTACKS.register("scaling", ScalingConfig)
class Scaling(Attack):
    config: ScalingConfig

    def corrupt(self, ids: Tensor, upload: Upload, malicious: Tensor) -> tuple[Tensor, Upload]:
        gamma = float(self.cohort) if self.config.factor is None else self.config.factor
        return ids, with_delta(upload, replace_rows(malicious, [gamma * d for d in upload.delta], upload.delta))
