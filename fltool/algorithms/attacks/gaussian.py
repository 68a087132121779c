"""gaussian: a malicious client uploads pure noise, N(0, std^2) in every coordinate,
instead of its update. Each client's noise comes from its own generator seeded by
(seed, round, client), so chunking and engines do not change it."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from fltool.algorithms.api import Upload
from fltool.algorithms.attacks.base import Attack, with_delta
from fltool.algorithms.sampling import derive_seed
from fltool.config.registry import ATTACKS
from fltool.config.schema import POSITIVE, AttackConfig


@dataclass
class GaussianConfig(AttackConfig):
    std: float = field(default=1.0, metadata=POSITIVE)


@ATTACKS.register("gaussian", GaussianConfig)
class Gaussian(Attack):
    config: GaussianConfig

    def corrupt(self, ids: Tensor, upload: Upload, malicious: Tensor) -> tuple[Tensor, Upload]:
        rows = malicious.nonzero().flatten().tolist()  # a host sync, only under this attack
        if not rows:
            return ids, upload
        device = upload.delta[0].device
        delta = [d.clone() for d in upload.delta]
        for row in rows:  # a few malicious clients a chunk: one generator each
            g = torch.Generator(device=device).manual_seed(derive_seed(self.seed, "gaussian", self.round, int(ids[row])))
            for d in delta:
                d[row] = torch.randn(d.shape[1:], generator=g, device=device) * self.config.std
        return ids, with_delta(upload, delta)
