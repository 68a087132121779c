"""FedAvg (McMahan et al. 2017, Algorithm 1), and the base every algorithm extends.

Each client runs E epochs of minibatch SGD from the global model w and uploads its
update w_k - w, weighted by its n_k examples; the server takes the weighted mean
Delta = sum_k n_k/n (w_k - w) and hands the server optimizer the pseudo-gradient
-Delta (sgd at lr 1 gives the paper's w <- w + Delta = sum_k n_k/n w_k).

Every hook is a default that another algorithm overrides: FedProx and SCAFFOLD add a
gradient term, FedNova normalises the upload, SCAFFOLD keeps state. See
`fltool.algorithms.api` for the order the hooks run in.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar, Protocol

from torch import Tensor

from fltool.algorithms.api import Aggregate, ClientInfo, LocalRule, Stacked, Upload
from fltool.config.registry import ALGORITHMS
from fltool.config.schema import AlgorithmConfig, FederatedConfig


class ServerStep(Protocol):
    """The server optimizer as an algorithm sees it: params, pseudo-gradient -> params."""

    def apply(self, params: Sequence[Tensor], pseudo_grad: Sequence[Tensor]) -> list[Tensor]: ...


def client_deltas(params: Sequence[Tensor], global_params: Sequence[Tensor]) -> list[Tensor]:
    """w_k - w for every client k of the stack (client dim 0)."""
    return [p - g.unsqueeze(0) for p, g in zip(params, global_params, strict=True)]


def per_client(values: Tensor, like: Tensor) -> Tensor:
    """(M,) values shaped to broadcast against a stacked (M, ...) tensor."""
    return values.view(-1, *[1] * (like.dim() - 1))


@ALGORITHMS.register("fedavg", AlgorithmConfig)
class FedAvg:
    # whether `adjust_gradients_` does anything: engines skip the call (and keep a
    # dense layer's low-rank gradient unmaterialised) when it does not
    adjusts_gradients: ClassVar[bool] = False
    # whether `client_upload` needs context["global_grad"]: each client's gradient of
    # its whole local data at the global model, which the engines then compute
    needs_global_gradient: ClassVar[bool] = False
    # whether `client_upload` fills Upload.extras, which DP's clipping and noise do not cover
    uploads_extras: ClassVar[bool] = False

    def __init__(self, config: AlgorithmConfig, federated: FederatedConfig) -> None:
        self.config = config
        self.rule = LocalRule(federated.local_epochs, federated.batch_size, federated.lr)

    def init_server_state(self, params: Sequence[Tensor]) -> dict[str, list[Tensor]]:
        """The server's state, parameter-shaped tensors (checkpointed)."""
        return {}

    def init_client_state(self, params: Sequence[Tensor]) -> dict[str, list[Tensor]]:
        """One client's initial state (without the client dim); every client of the
        federation keeps its own copy across rounds (checkpointed)."""
        return {}

    def client_context(self, server_state: dict[str, list[Tensor]], client_state: Stacked, global_params: Sequence[Tensor]) -> Stacked:
        """What a chunk of clients receives besides the model (broadcast): built from the
        server state and the clients' own state rows (M, ...)."""
        return {}

    def adjust_gradients_(
        self, grads: list[Tensor], params: Sequence[Tensor], anchor: Sequence[Tensor], context: Stacked, active: Tensor
    ) -> None:
        """Change each local step's gradients in place, before the SGD step. `active`
        (M,) is 0 for a client whose schedule has ended: keep any added term off it."""

    def client_upload(self, global_params: Sequence[Tensor], params: Sequence[Tensor], context: Stacked, info: ClientInfo) -> Upload:
        """What each client sends after its local steps: update, weight, new state."""
        return Upload(delta=client_deltas(params, global_params), weight=info.n)

    def server_update(
        self, global_params: Sequence[Tensor], aggregate: Aggregate, server_state: dict[str, list[Tensor]], optimizer: ServerStep
    ) -> tuple[list[Tensor], dict[str, list[Tensor]]]:
        """The new global model and server state from the cohort's aggregate."""
        return optimizer.apply(global_params, [-d for d in aggregate.delta]), server_state
