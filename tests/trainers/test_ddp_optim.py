"""The DDP trainer's optimizer and learning-rate schedule, against their definitions."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from fltool.config.schema import DDPConfig
from fltool.trainers.ddp_optim import WarmupCosine, make_optimizer, make_scheduler, resume_schedule, schedule_rule


@pytest.mark.parametrize(
    "name,kind,momentum", [("sgd", torch.optim.SGD, 0.0), ("momentum", torch.optim.SGD, 0.7), ("adamw", torch.optim.AdamW, None)]
)
def test_optimizers_take_lr_weight_decay_and_momentum_only_where_it_applies(name, kind, momentum) -> None:
    opt = make_optimizer(nn.Linear(2, 2), DDPConfig(optimizer=name, lr=0.3, momentum=0.7, weight_decay=0.01))
    group = opt.param_groups[0]
    assert type(opt) is kind and group["lr"] == 0.3 and group["weight_decay"] == 0.01
    if momentum is not None:
        assert group["momentum"] == momentum
    else:
        assert group["betas"] == (0.9, 0.999)  # AdamW's own, untouched by ddp.momentum


def test_warmup_then_cosine_to_zero_or_constant() -> None:
    rule = WarmupCosine(warmup=4, total=14, cosine=True)
    assert [rule(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert rule(9) == pytest.approx(0.5 * (1 + math.cos(math.pi * 5 / 10)))
    assert rule(14) == pytest.approx(0.0, abs=1e-12) and rule(20) == pytest.approx(0.0, abs=1e-12)
    assert WarmupCosine(warmup=4, total=14, cosine=False)(9) == 1.0


def test_a_stretched_schedule_resumes_at_the_new_rules_rate() -> None:
    """Saved at the end of a 10-step cosine (lr 0 set for the next step), resumed to run
    30 steps: the next step runs at the 30-step rule's rate at step 10, and so on."""
    cfg = DDPConfig(lr=0.2, schedule="cosine", warmup_steps=2)
    opt = make_optimizer(nn.Linear(2, 2), cfg)
    sched = make_scheduler(opt, cfg, 10)
    for _ in range(10):
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)

    new_opt = make_optimizer(nn.Linear(2, 2), cfg)
    new_opt.load_state_dict(opt.state_dict())
    new_sched = make_scheduler(new_opt, cfg, 30)
    rule = schedule_rule(cfg, 30)
    resume_schedule(new_sched, sched.state_dict(), rule)
    for step in range(10, 14):
        assert new_opt.param_groups[0]["lr"] == pytest.approx(0.2 * rule(step))
        assert new_sched.get_last_lr() == [new_opt.param_groups[0]["lr"]]
        new_opt.step()
        new_sched.step()
