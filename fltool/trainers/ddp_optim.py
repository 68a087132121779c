"""Optimizer and learning-rate schedule of the DDP trainer, from `cfg.ddp`."""

from __future__ import annotations

import math

import torch
from torch import nn

from fltool.config.schema import DDPConfig


def make_optimizer(model: nn.Module, cfg: DDPConfig) -> torch.optim.Optimizer:
    params = model.parameters()
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    momentum = cfg.momentum if cfg.optimizer == "momentum" else 0.0
    return torch.optim.SGD(params, lr=cfg.lr, momentum=momentum, weight_decay=cfg.weight_decay)


class WarmupCosine:
    """LR multiplier: linear warmup over `warmup` steps, then constant or cosine to 0.

    A small class (not a closure) so LambdaLR can put its fields in the state_dict.
    """

    def __init__(self, warmup: int, total: int, cosine: bool) -> None:
        self.warmup = warmup
        self.total = total
        self.cosine = cosine

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        if not self.cosine:
            return 1.0
        span = max(1, self.total - self.warmup)
        progress = min(1.0, (step - self.warmup) / span)
        return 0.5 * (1.0 + math.cos(math.pi * progress))


def schedule_rule(cfg: DDPConfig, total_steps: int) -> WarmupCosine:
    return WarmupCosine(cfg.warmup_steps, total_steps, cfg.schedule == "cosine")


def make_scheduler(
    optimizer: torch.optim.Optimizer, cfg: DDPConfig, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, schedule_rule(cfg, total_steps))


def resume_schedule(scheduler: torch.optim.lr_scheduler.LambdaLR, state: dict, rule: WarmupCosine) -> None:
    """Load a saved schedule, then follow `rule` (the config's: a resumed run may have
    more epochs) from the saved step on. Call it after the optimizer's load_state_dict.

    LambdaLR restores the saved rule's fields, and the optimizer the rate that rule set
    for the next step; both give way to `rule`, or a stretched cosine's first resumed
    step would run at the old schedule's last rate (0)."""
    scheduler.load_state_dict(state)
    groups = scheduler.optimizer.param_groups
    scheduler.lr_lambdas = [rule] * len(groups)
    for group, base in zip(groups, scheduler.base_lrs, strict=True):
        group["lr"] = base * rule(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in groups]
