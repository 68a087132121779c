"""Attacks by malicious clients, one file each, registered by name for the config's
`attack` section (see `base` for where the trainer applies them)."""

from fltool.algorithms.attacks import alie, gaussian, label_flip, scaling, sign_flip
from fltool.algorithms.attacks.base import Attack

__all__ = ["Attack", "alie", "gaussian", "label_flip", "scaling", "sign_flip"]
