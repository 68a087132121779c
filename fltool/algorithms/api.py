"""The algorithm API: a federated algorithm as small pure hooks over a leading client dim.

A round, as the trainer and the engines run it:

    context = algorithm.client_context(server_state, client_rows, w)   # broadcast, per chunk
    for each local step (engine):   grads -> algorithm.adjust_gradients_(...)  # FedProx, SCAFFOLD
    upload  = algorithm.client_upload(w, w_k, context, info)            # delta, weight, new state
    agg     = aggregator over the cohort's uploads                        # mean (streamed) or gathered
    w, server_state = algorithm.server_update(w, agg, server_state, server_optimizer)

Every hook sees tensors with a leading client dimension M: the sequential engine calls
them with M = 1, the vectorized engine with a whole chunk (and captures
`adjust_gradients_` into its CUDA graph). Hooks never print, touch files, or
synchronise with the host; they return tensors. An algorithm subclasses `FedAvg`
(`fltool.algorithms.fedavg`) and overrides only what differs, then registers itself
with its config class: `@ALGORITHMS.register("name", MyConfig)`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor

# name -> one tensor per model parameter, each with a leading client dim (M, ...)
Stacked = dict[str, list[Tensor]]


@dataclass(frozen=True)
class LocalRule:
    """How every client trains locally: E epochs of minibatch SGD at lr."""

    epochs: int
    batch_size: int | None  # None: full batch
    lr: float


@dataclass
class ClientInfo:
    """The chunk of clients a hook is called for, as (M,) device tensors."""

    ids: Tensor  # long
    n: Tensor  # float: examples
    steps: Tensor  # float: local steps taken this round


@dataclass
class Upload:
    """What a chunk of clients sends back.

    `delta` is what the aggregator combines (median, mean, ...). `extras` are always
    averaged with the same weights, never robustly (FedNova's step counts, SCAFFOLD's
    control-variate deltas). `state` holds the clients' new persistent rows."""

    delta: list[Tensor]  # (M, ...) per parameter
    weight: Tensor  # (M,)
    extras: Stacked = field(default_factory=dict)
    state: Stacked = field(default_factory=dict)


@dataclass
class Aggregate:
    """The cohort's uploads combined (over every rank under `launch`)."""

    delta: list[Tensor]  # the aggregator's combination of the deltas, parameter-shaped
    extras: dict[str, list[Tensor]]  # weighted means of the extras, without the client dim
    clients: int  # clients in the cohort
    num_clients: int  # K, clients in the federation
