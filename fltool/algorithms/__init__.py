"""Federated algorithms, one file each, registered by name (see `api` for the hooks).

Importing this package registers the built-ins: algorithms, server optimizers,
aggregators, attacks and compressors, which the config's sections of those names
choose from.
"""

from fltool.algorithms import aggregators, attacks, compression, fedavg, fednova, fedprox, fedsgd, scaffold, server_optimizers
from fltool.algorithms.api import Aggregate, ClientInfo, LocalRule, Stacked, Upload
from fltool.algorithms.client_state import ClientStore
from fltool.algorithms.fedavg import FedAvg
from fltool.algorithms.sampling import derive_seed, sample_clients
from fltool.config.registry import AGGREGATORS, ALGORITHMS, ATTACKS, COMPRESSORS, SERVER_OPTIMIZERS

__all__ = [
    "AGGREGATORS",
    "ALGORITHMS",
    "ATTACKS",
    "COMPRESSORS",
    "SERVER_OPTIMIZERS",
    "Aggregate",
    "ClientInfo",
    "ClientStore",
    "FedAvg",
    "LocalRule",
    "Stacked",
    "Upload",
    "aggregators",
    "attacks",
    "compression",
    "derive_seed",
    "fedavg",
    "fednova",
    "fedprox",
    "fedsgd",
    "sample_clients",
    "scaffold",
    "server_optimizers",
]
