"""label_flip: a malicious client trains honestly on poisoned labels, y -> C - 1 - y
(data poisoning; its upload is left alone)."""

from __future__ import annotations

from torch import Tensor

from fltool.algorithms.attacks.base import Attack
from fltool.config.registry import ATTACKS
from fltool.config.schema import AttackConfig


@ATTACKS.register("label_flip", AttackConfig)
class LabelFlip(Attack):
    def poison_labels(self, y: Tensor, num_classes: int) -> Tensor:
        return num_classes - 1 - y
