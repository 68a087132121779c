"""sign_flip: a malicious client uploads -k * delta, its honest update reversed and
scaled. With a fraction f of malicious weight, the mean is (1 - f - k f) times the
honest one: it points backwards once k f > 1 - f (k > 9 at f = 10%), hence the
default k = 10."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor

from fltool.algorithms.api import Upload
from fltool.algorithms.attacks.base import Attack, replace_rows, with_delta
from fltool.config.registry import ATTACKS
from fltool.config.schema import NON_NEGATIVE, AttackConfig


@dataclass
class SignFlipConfig(AttackConfig):
    k: float = field(default=10.0, metadata=NON_NEGATIVE)


@ATTACKS.register("sign_flip", SignFlipConfig)
class SignFlip(Attack):
    config: SignFlipConfig

    def corrupt(self, ids: Tensor, upload: Upload, malicious: Tensor) -> tuple[Tensor, Upload]:
        return ids, with_delta(upload, replace_rows(malicious, [-self.config.k * d for d in upload.delta], upload.delta))
