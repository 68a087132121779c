from __future__ import annotations

import pytest
import torch

from fltool.config.schema import DataConfig
from fltool.data.partition import (
    dirichlet_partition,
    iid_partition,
    label_histogram,
    partition,
    shard_partition,
)
from fltool.errors import FltoolError


def balanced_labels(per_class: int = 60, classes: int = 10) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    labels = torch.arange(classes).repeat_interleave(per_class)
    return labels[torch.randperm(labels.numel(), generator=g)]


def assert_exact_cover(parts: list[torch.Tensor], n: int) -> None:
    allidx = torch.cat(parts)
    assert allidx.numel() == n, "every example used"
    assert torch.equal(torch.sort(allidx).values, torch.arange(n)), "each exactly once (disjoint)"


@pytest.mark.parametrize("kind", ["iid", "shards", "dirichlet"])
def test_partitions_cover_every_example_once_and_are_seeded(kind: str):
    labels = balanced_labels()
    cfg = DataConfig(partition=kind, alpha=0.5)
    parts = partition(labels, 10, cfg, seed=3)
    assert len(parts) == 10
    assert_exact_cover(parts, labels.numel())
    assert all(p.numel() > 0 for p in parts)
    again = partition(labels, 10, cfg, seed=3)
    assert all(torch.equal(a, b) for a, b in zip(parts, again))
    other = partition(labels, 10, cfg, seed=4)
    assert any(not torch.equal(a, b) for a, b in zip(parts, other))


def test_iid_sizes_differ_by_at_most_one():
    sizes = [p.numel() for p in iid_partition(1003, 10, seed=0)]
    assert max(sizes) - min(sizes) <= 1 and sum(sizes) == 1003


def test_shards_give_each_client_at_most_two_labels():
    # 10 classes x 60 = 600 examples, 20 clients x 2 shards of 15: shards never straddle labels.
    labels = balanced_labels(60)
    parts = shard_partition(labels, 20, 2, seed=0)
    hist = label_histogram(labels, parts, 10)
    labels_per_client = (hist > 0).sum(1)
    assert labels_per_client.max().item() <= 2
    assert (labels_per_client == 2).float().mean().item() > 0.5  # pairs of equal labels are rare
    assert all(p.numel() == 30 for p in parts)


@pytest.mark.parametrize("shards", [1, 3, 5])
def test_shards_per_client_sets_the_labels_a_client_can_hold(shards: int):
    # 10 classes x 60, 10 clients x `shards` shards of 60/shards: no shard straddles labels
    labels = balanced_labels(60)
    parts = partition(labels, 10, DataConfig(partition="shards", shards_per_client=shards), seed=0)
    labels_per_client = (label_histogram(labels, parts, 10) > 0).sum(1)
    assert labels_per_client.max().item() <= shards and all(p.numel() == 60 for p in parts)
    if shards == 1:  # one whole class each
        assert labels_per_client.tolist() == [1] * 10
    else:
        assert labels_per_client.float().mean().item() > 1.5


def test_shards_on_real_mnist_labels_are_pathological(mnist_root):
    from fltool.data import load_dataset

    labels = load_dataset(DataConfig(dataset="mnist", root=str(mnist_root))).train.y
    parts = shard_partition(labels, 100, 2, seed=0)  # McMahan: 200 shards of 300
    assert_exact_cover(parts, 60000)
    labels_per_client = (label_histogram(labels, parts, 10) > 0).sum(1)
    # A shard may straddle a label boundary, so a few clients see 3 or 4 labels.
    assert labels_per_client.max().item() <= 4
    assert (labels_per_client <= 2).float().mean().item() >= 0.8


def test_dirichlet_skew_grows_as_alpha_falls():
    labels = balanced_labels(200)

    def mean_top_label_share(alpha: float) -> float:
        hist = label_histogram(labels, dirichlet_partition(labels, 20, alpha, seed=0), 10).float()
        return (hist.max(1).values / hist.sum(1)).mean().item()

    shares = [mean_top_label_share(a) for a in (100.0, 1.0, 0.1)]
    assert shares[0] < shares[1] < shares[2]
    assert shares[0] < 0.25 and shares[2] > 0.5  # observed: 0.115 and 0.572 at seed 0


def test_dirichlet_sizes_are_unequal_and_nonempty():
    labels = balanced_labels(50)
    sizes = [p.numel() for p in dirichlet_partition(labels, 30, 0.1, seed=0)]
    assert min(sizes) >= 1 and max(sizes) > 2 * min(sizes)
    assert sum(sizes) == 500


@pytest.mark.parametrize("alpha", [1e-10, 1e-300])
def test_a_vanishing_alpha_gives_each_class_to_one_drawn_client(alpha: float):
    """Dir(alpha -> 0) is one-hot: every gamma draw underflows to 0 here, and each class
    must still go whole to a client drawn uniformly, not all ten to the last client."""
    labels = balanced_labels(200)
    parts = dirichlet_partition(labels, 20, alpha, seed=0)
    assert_exact_cover(parts, labels.numel())
    hist = label_histogram(labels, parts, 10)
    owners = hist.argmax(0)
    assert (hist.max(0).values >= 200 - 19).all()  # whole, but for single examples moved to empty clients
    assert len(set(owners.tolist())) > 3  # 10 classes, 20 clients: not all to one client


def test_more_clients_than_examples_is_a_user_error():
    with pytest.raises(FltoolError, match="num_clients"):
        partition(torch.zeros(5, dtype=torch.long), 6, DataConfig(), seed=0)
