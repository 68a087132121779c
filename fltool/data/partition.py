"""Split training examples among K clients, deterministically from a seed.

Every partitioner returns one index tensor per client; together they use every
example exactly once. Client sizes n_k may differ.
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING

import torch

from fltool.config.schema import Config, DataConfig
from fltool.errors import FltoolError

if TYPE_CHECKING:
    from fltool.data.datasets import Dataset


def partition(labels: torch.Tensor, num_clients: int, cfg: DataConfig, seed: int) -> list[torch.Tensor]:
    if num_clients > labels.numel():
        raise FltoolError(
            f"federated.num_clients: {num_clients} clients but only {labels.numel()} training examples"
        )
    if cfg.partition == "iid":
        return iid_partition(labels.numel(), num_clients, seed)
    if cfg.partition == "shards":
        return shard_partition(labels, num_clients, cfg.shards_per_client, seed)
    return dirichlet_partition(labels, num_clients, cfg.alpha, seed)


def iid_partition(n: int, num_clients: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=g)
    return [chunk.clone() for chunk in torch.tensor_split(perm, num_clients)]


def shard_partition(labels: torch.Tensor, num_clients: int, shards_per_client: int, seed: int) -> list[torch.Tensor]:
    """McMahan et al. 2017: sort by label, cut into shards_per_client*K shards, deal them out."""
    g = torch.Generator().manual_seed(seed)
    shuffled = torch.randperm(labels.numel(), generator=g)  # random order within each label
    by_label = shuffled[torch.sort(labels[shuffled], stable=True).indices]
    shards = torch.tensor_split(by_label, num_clients * shards_per_client)
    order = torch.randperm(len(shards), generator=g).view(num_clients, shards_per_client)
    return [torch.cat([shards[s] for s in row.tolist()]) for row in order]


def dirichlet_partition(labels: torch.Tensor, num_clients: int, alpha: float, seed: int) -> list[torch.Tensor]:
    """Label skew: each class is split among clients in proportions drawn from Dir(alpha)."""
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    parts: list[list[torch.Tensor]] = [[] for _ in range(num_clients)]
    for c in torch.unique(labels).tolist():
        idx = torch.nonzero(labels == c).flatten()
        idx = idx[torch.randperm(idx.numel(), generator=g)]
        draws = [rng.gammavariate(alpha, 1.0) for _ in range(num_clients)]
        total = sum(draws)
        if total == 0.0:
            # every draw underflowed (alpha below ~1e-3): the largest would outweigh the
            # next by a factor past any float, so Dir(alpha) is one-hot at a uniformly
            # drawn client (all to the last one, as a 0/0 fallback did, is no draw at all)
            draws[rng.randrange(num_clients)] = total = 1.0
        cuts, acc = [], 0.0
        for d in draws[:-1]:
            acc += d / total
            cuts.append(round(acc * idx.numel()))
        for k, piece in enumerate(torch.tensor_split(idx, cuts)):
            parts[k].append(piece)
    clients = [torch.cat(p) for p in parts]
    return _fill_empty_clients(clients)


def _fill_empty_clients(clients: list[torch.Tensor]) -> list[torch.Tensor]:
    """A client with no data cannot train; move single examples from the largest clients."""
    for k in range(len(clients)):
        if clients[k].numel() == 0:
            donor = max(range(len(clients)), key=lambda j: clients[j].numel())
            clients[k], clients[donor] = clients[donor][-1:], clients[donor][:-1]
    return clients


def label_histogram(labels: torch.Tensor, clients: list[torch.Tensor], num_classes: int) -> torch.Tensor:
    """[K, num_classes] counts, for inspecting skew."""
    return torch.stack([torch.bincount(labels[idx], minlength=num_classes) for idx in clients])


def natural_partition(client_ids: torch.Tensor, min_examples: int = 1) -> list[torch.Tensor]:
    """One client per distinct id, in increasing id order, holding its examples in data
    order; ids with fewer than `min_examples` examples are dropped with their examples
    (a client of 1 example gives a noisy update and, weighted by n_k, says little)."""
    ids, inverse, counts = torch.unique(client_ids, return_inverse=True, return_counts=True)
    order = torch.argsort(inverse, stable=True)
    parts = torch.split(order, counts.tolist())
    return [p.clone() for p, n in zip(parts, counts.tolist()) if n >= min_examples]


def natural_clients(cfg: Config, dataset: Dataset) -> list[torch.Tensor]:
    """The natural partition of `dataset`'s training set, and `cfg.federated.num_clients`
    set to its client count: everything that sizes per-client state or samples cohorts
    reads K from there, and a run's stored config records the K it trained with."""
    ids = dataset.train.client
    if ids is None:
        raise FltoolError(f"data.partition: natural needs client ids; {dataset.name} returned none (see fltool.data.user)")
    parts = natural_partition(ids, cfg.data.min_examples)
    if not parts:
        raise FltoolError(f"data.min_examples: no client has {cfg.data.min_examples} or more examples")
    cfg.federated.num_clients = len(parts)
    return parts
