from fltool.algorithms.aggregate import WeightedSum, server_update, weighted_average
from fltool.algorithms.local import LocalRule, batch_schedule, client_update, rule_for
from fltool.algorithms.sampling import derive_seed, sample_clients

__all__ = [
    "LocalRule",
    "WeightedSum",
    "batch_schedule",
    "client_update",
    "derive_seed",
    "rule_for",
    "sample_clients",
    "server_update",
    "weighted_average",
]
