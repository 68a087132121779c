"""FedNova (Wang et al. 2020, "Tackling the Objective Inconsistency Problem"), over
plain local SGD: clients that take more local steps (more data, more epochs) would pull
FedAvg's average toward their own optimum; FedNova averages each client's update per
step instead and rescales by the cohort's effective step count:

    d_k = (w_k - w) / tau_k,   tau_eff = sum_k p_k tau_k,   w <- w + tau_eff * sum_k p_k d_k

with p_k = n_k / n and tau_k client k's local steps (for SGD, ||a_k||_1 = tau_k). With
equal tau_k this is FedAvg exactly. The server optimizer gets -tau_eff sum_k p_k d_k.
"""

from __future__ import annotations

from typing import ClassVar

from collections.abc import Sequence

from torch import Tensor

from fltool.algorithms.api import Aggregate, ClientInfo, Stacked, Upload
from fltool.algorithms.fedavg import FedAvg, ServerStep, client_deltas, per_client
from fltool.config.registry import ALGORITHMS
from fltool.config.schema import AlgorithmConfig


@ALGORITHMS.register("fednova", AlgorithmConfig)
class FedNova(FedAvg):
    uploads_extras: ClassVar[bool] = True
    def client_upload(self, global_params: Sequence[Tensor], params: Sequence[Tensor], context: Stacked, info: ClientInfo) -> Upload:
        normalised = [d / per_client(info.steps, d) for d in client_deltas(params, global_params)]
        return Upload(delta=normalised, weight=info.n, extras={"tau": [info.steps]})

    def server_update(
        self, global_params: Sequence[Tensor], aggregate: Aggregate, server_state: dict[str, list[Tensor]], optimizer: ServerStep
    ) -> tuple[list[Tensor], dict[str, list[Tensor]]]:
        tau_eff = aggregate.extras["tau"][0]
        return optimizer.apply(global_params, [-tau_eff * d for d in aggregate.delta]), server_state
