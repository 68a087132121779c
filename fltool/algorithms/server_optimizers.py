"""Server optimizers (Reddi et al. 2021, "Adaptive Federated Optimization", Algorithm 2).

The server treats the cohort's aggregated update Delta as a pseudo-gradient g = -Delta
and steps with an optimizer of its own, composable with any client algorithm:
- sgd:      w <- w - lr * g; with momentum b (FedAvgM, Hsu et al. 2019): v <- b v + g,
            w <- w - lr * v. lr 1, momentum 0 is plain FedAvg.
- adagrad:  v <- v + g^2
- adam:     v <- b2 v + (1 - b2) g^2
- yogi:     v <- v - (1 - b2) g^2 sign(v - g^2)
  and for these three m <- b1 m + (1 - b1) g,  w <- w - lr * m / (sqrt(v) + tau),
  with v starting at tau^2 (the paper's v_{-1} >= tau^2) and no bias correction, as in
  Algorithm 2; `bias_correction: true` scales lr by sqrt(1 - b2^t) / (1 - b1^t) at
  server step t = 1, 2, ... (Kingma & Ba). docs/algorithms.md compares the defaults
  with the paper's and Flower's.
State (m, v, step count) is tensors, checkpointed with the run.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from fltool.config.registry import SERVER_OPTIMIZERS
from fltool.config.schema import POSITIVE, ServerOptimizerConfig, _check

BETA = _check(lambda v: 0 <= v < 1, "in [0, 1)")


@dataclass
class SGDConfig(ServerOptimizerConfig):
    momentum: float = field(default=0.0, metadata=BETA)


@dataclass
class AdaptiveConfig(ServerOptimizerConfig):
    lr: float = field(default=0.01, metadata=POSITIVE)
    beta1: float = field(default=0.9, metadata=BETA)
    beta2: float = field(default=0.99, metadata=BETA)
    # adaptivity: larger is closer to sgd; v starts at tau^2, a float32 tensor
    tau: float = field(default=1e-3, metadata=_check(lambda v: 0 < v <= 1e18, "a number in (0, 1e18] (v starts at tau^2, in float32)"))
    bias_correction: bool = False


@SERVER_OPTIMIZERS.register("sgd", SGDConfig)
class ServerSGD:
    def __init__(self, config: SGDConfig, params: Sequence[Tensor]) -> None:
        self.config = config
        self.state: dict[str, list[Tensor]] = {}
        if config.momentum > 0:
            self.state["momentum"] = [torch.zeros_like(p) for p in params]

    def apply(self, params: Sequence[Tensor], pseudo_grad: Sequence[Tensor]) -> list[Tensor]:
        grads = list(pseudo_grad)
        if self.config.momentum > 0:
            v = self.state["momentum"]
            torch._foreach_mul_(v, self.config.momentum)
            torch._foreach_add_(v, grads)
            grads = v
        if self.config.lr == 1.0:
            return torch._foreach_sub(list(params), grads)
        return torch._foreach_add(list(params), grads, alpha=-self.config.lr)


class ServerAdaptive:
    """m, v and the step count; subclasses give v's update."""

    def __init__(self, config: AdaptiveConfig, params: Sequence[Tensor]) -> None:
        self.config = config
        self.state = {
            "m": [torch.zeros_like(p) for p in params],
            "v": [torch.full_like(p, config.tau**2) for p in params],
            "step": [torch.zeros((), dtype=torch.int64, device=params[0].device)],
        }

    def update_v_(self, v: list[Tensor], g2: list[Tensor]) -> None:
        raise NotImplementedError

    def apply(self, params: Sequence[Tensor], pseudo_grad: Sequence[Tensor]) -> list[Tensor]:
        cfg, m, v = self.config, self.state["m"], self.state["v"]
        grads = list(pseudo_grad)
        self.state["step"][0].add_(1)
        torch._foreach_lerp_(m, grads, 1 - cfg.beta1)  # b1 m + (1 - b1) g
        self.update_v_(v, torch._foreach_mul(grads, grads))
        denom = torch._foreach_add(torch._foreach_sqrt(v), cfg.tau)
        step = torch._foreach_div(m, denom)
        lr: float | Tensor = cfg.lr
        if cfg.bias_correction:
            t = self.state["step"][0].double()
            lr = (cfg.lr * torch.sqrt(1 - cfg.beta2**t) / (1 - cfg.beta1**t)).float()
            torch._foreach_mul_(step, lr)
            return torch._foreach_sub(list(params), step)
        return torch._foreach_add(list(params), step, alpha=-lr)


@SERVER_OPTIMIZERS.register("adagrad", AdaptiveConfig)
class ServerAdagrad(ServerAdaptive):
    def update_v_(self, v: list[Tensor], g2: list[Tensor]) -> None:
        torch._foreach_add_(v, g2)


@SERVER_OPTIMIZERS.register("adam", AdaptiveConfig)
class ServerAdam(ServerAdaptive):
    def update_v_(self, v: list[Tensor], g2: list[Tensor]) -> None:
        torch._foreach_lerp_(v, g2, 1 - self.config.beta2)


@SERVER_OPTIMIZERS.register("yogi", AdaptiveConfig)
class ServerYogi(ServerAdaptive):
    def update_v_(self, v: list[Tensor], g2: list[Tensor]) -> None:
        for vi, gi in zip(v, g2, strict=True):
            vi.sub_((1 - self.config.beta2) * gi * torch.sign(vi - gi))

