"""The attack interface, and `none`.

An attack is what malicious clients do instead of their honest part. The trainer
decides who is malicious (seeded, see `fltool.trainers.availability`) and routes every
upload through the attack on its way to the aggregator, under any engine:

    y = attack.poison_labels(y, classes)         # before training: data poisoning
    attack.start_round(round, cohort, malicious)  # how many of the cohort are malicious
    ids, upload = attack.corrupt(ids, upload, mask)  # per chunk: model poisoning
    held = attack.finish(comm)                    # uploads held back until the cohort is seen

Client state rows always come from the honest upload: an attack changes what the
server receives, not what the client remembers.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from fltool.algorithms.api import Upload
from fltool.algorithms.fedavg import per_client
from fltool.config.registry import ATTACKS
from fltool.config.schema import AttackConfig


@ATTACKS.register("none", AttackConfig)
class Attack:
    """No attack; every attack subclasses this and overrides what it changes."""

    def __init__(self, config: AttackConfig, seed: int) -> None:
        self.config = config
        self.seed = seed
        self.round = 0
        self.cohort = 0
        self.malicious = 0

    def poison_labels(self, y: Tensor, num_classes: int) -> Tensor:
        """A malicious client's training labels."""
        return y

    def start_round(self, round_: int, cohort: int, malicious: int) -> None:
        """A round begins with `malicious` of its `cohort` clients malicious (all ranks)."""
        self.round, self.cohort, self.malicious = round_, cohort, malicious

    def corrupt(self, ids: Tensor, upload: Upload, malicious: Tensor) -> tuple[Tensor, Upload]:
        """What a chunk sends, and for which clients: `malicious` (M,) bool marks the
        rows to corrupt (an attack may hold rows back until `finish`)."""
        return ids, upload

    def finish(self, comm: Any) -> tuple[Tensor, Upload] | None:
        """Uploads held back by `corrupt` until the whole cohort was seen (ALIE's)."""
        return None


def replace_rows(malicious: Tensor, corrupted: list[Tensor], honest: list[Tensor]) -> list[Tensor]:
    """Each parameter stack with the malicious rows taken from `corrupted`."""
    return [torch.where(per_client(malicious, h), c, h) for c, h in zip(corrupted, honest, strict=True)]


def with_delta(upload: Upload, delta: list[Tensor]) -> Upload:
    return Upload(delta=delta, weight=upload.weight, extras=upload.extras, state=upload.state)
