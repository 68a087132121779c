"""FedSGD (McMahan et al. 2017, the baseline of Section 2): each client takes one
full-batch gradient step, so the server's weighted mean of updates is one step of
large-batch SGD on the cohort's data: w <- w - lr * sum_k n_k/n g_k."""

from __future__ import annotations

from fltool.algorithms.api import LocalRule
from fltool.algorithms.fedavg import FedAvg
from fltool.config.registry import ALGORITHMS
from fltool.config.schema import AlgorithmConfig, FederatedConfig


@ALGORITHMS.register("fedsgd", AlgorithmConfig)
class FedSGD(FedAvg):
    def __init__(self, config: AlgorithmConfig, federated: FederatedConfig) -> None:
        super().__init__(config, federated)
        self.rule = LocalRule(epochs=1, batch_size=None, lr=federated.lr)
