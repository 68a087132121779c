"""SCAFFOLD (Karimireddy et al. 2020, Algorithm 1): control variates correct client drift.

The server keeps c, every client i its own c_i (kept across rounds for all N clients,
sampled or not). A local step uses g_i(y) - c_i + c; afterwards, with K_i local steps
at lr eta_l from the global model x to y_i:
- option I:  c_i+ = g_i(x), the gradient of client i's whole local data at x;
- option II: c_i+ = c_i - c + (x - y_i) / (K_i eta_l)   (the paper's default);
and the client uploads (y_i - x, c_i+ - c_i). The server sets
    x <- x + eta_g * (1/|S|) sum_i (y_i - x),   c <- c + (1/N) sum_i (c_i+ - c_i),
eta_g being the server optimizer's lr (any server optimizer composes). Clients count
equally (weight 1), as in the paper's objective (1/N) sum_i f_i.
"""

from __future__ import annotations

from typing import ClassVar

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from fltool.algorithms.api import Aggregate, ClientInfo, Stacked, Upload
from fltool.algorithms.fedavg import FedAvg, ServerStep, client_deltas, per_client
from fltool.config.registry import ALGORITHMS
from fltool.config.schema import AlgorithmConfig, _check


@dataclass
class ScaffoldConfig(AlgorithmConfig):
    option: int = field(default=2, metadata=_check(lambda v: v in (1, 2), "1 or 2 (the paper's options I and II)"))


@ALGORITHMS.register("scaffold", ScaffoldConfig)
class Scaffold(FedAvg):
    uploads_extras: ClassVar[bool] = True
    config: ScaffoldConfig
    adjusts_gradients = True

    @property
    def needs_global_gradient(self) -> bool:
        """Option I: engines hand `client_upload` each client's full-data gradient at x
        as context["global_grad"] (one more full-batch pass)."""
        return self.config.option == 1

    def init_server_state(self, params: Sequence[Tensor]) -> dict[str, list[Tensor]]:
        return {"c": [torch.zeros_like(p) for p in params]}

    def init_client_state(self, params: Sequence[Tensor]) -> dict[str, list[Tensor]]:
        return {"c": [torch.zeros_like(p) for p in params]}

    def client_context(self, server_state: dict[str, list[Tensor]], client_state: Stacked, global_params: Sequence[Tensor]) -> Stacked:
        c_i = client_state["c"]
        c = server_state["c"]
        # c - c_i in c_i's memory layout, the engine's (see ClientStore), where `c - c_i` would take c's
        correction = [torch.sub(s, ci, out=torch.empty_like(ci)) for s, ci in zip(c, c_i, strict=True)]
        # -c as (1, ...): the same for every client of the chunk, broadcast
        return {"c_i": c_i, "correction": correction, "minus_c": [-s.unsqueeze(0) for s in c]}

    def adjust_gradients_(
        self, grads: list[Tensor], params: Sequence[Tensor], anchor: Sequence[Tensor], context: Stacked, active: Tensor
    ) -> None:
        for g, corr in zip(grads, context["correction"], strict=True):
            g.addcmul_(corr, per_client(active, corr))

    def client_upload(self, global_params: Sequence[Tensor], params: Sequence[Tensor], context: Stacked, info: ClientInfo) -> Upload:
        delta = client_deltas(params, global_params)
        if self.config.option == 1:
            c_new = list(context["global_grad"])
            dc = [cn - ci for cn, ci in zip(c_new, context["c_i"], strict=True)]
        else:  # c_i+ = c_i - c + (x - y_i) / (K_i lr), so c_i+ - c_i = -c - d / (K_i lr) with d = y_i - x
            scale = -1.0 / (info.steps * self.rule.lr)
            # in d's memory layout (the engine's): two passes over the rows, no temporaries
            dc = [
                torch.addcmul(minus_c, d, per_client(scale, d), out=torch.empty_like(d))
                for minus_c, d in zip(context["minus_c"], delta, strict=True)
            ]
            c_new = [ci + x for ci, x in zip(context["c_i"], dc, strict=True)]
        return Upload(delta=delta, weight=torch.ones_like(info.n), extras={"c": dc}, state={"c": c_new})

    def server_update(
        self, global_params: Sequence[Tensor], aggregate: Aggregate, server_state: dict[str, list[Tensor]], optimizer: ServerStep
    ) -> tuple[list[Tensor], dict[str, list[Tensor]]]:
        new = optimizer.apply(global_params, [-d for d in aggregate.delta])
        # (1/N) sum_{i in S} dc_i = |S|/N * mean_{i in S} dc_i
        share = aggregate.clients / aggregate.num_clients
        c = [c + share * dc for c, dc in zip(server_state["c"], aggregate.extras["c"], strict=True)]
        return new, {"c": c}
