import torch

from fltool.distributed.sharding import rank_batches, steps_per_epoch


def test_two_ranks_split_exactly_the_global_batches_of_one_rank():
    n, seed, epoch = 100, 7, 3
    one = rank_batches(n, seed, epoch, batch_size=32, accum=1, rank=0, world_size=1)
    halves = [rank_batches(n, seed, epoch, batch_size=16, accum=1, rank=r, world_size=2) for r in range(2)]
    assert one.shape == (steps_per_epoch(n, 32), 1, 32) == (4, 1, 32)
    for step in range(one.shape[0]):
        together = torch.cat([halves[0][step, 0], halves[1][step, 0]])
        assert sorted(together.tolist()) == sorted(one[step, 0].tolist())


def test_every_example_is_seen_each_epoch_and_padding_wraps_around():
    n = 100
    parts = [rank_batches(n, 0, 1, batch_size=8, accum=2, rank=r, world_size=2) for r in range(2)]
    seen = torch.cat([p.reshape(-1) for p in parts])
    assert seen.numel() == 4 * 2 * 8 * 2  # ceil(100 / 32) steps of a global batch of 32
    assert set(seen.tolist()) == set(range(n))


def test_epochs_are_shuffled_differently_and_reproducibly():
    a1 = rank_batches(64, 0, 1, 16, 1, 0, 2)
    a2 = rank_batches(64, 0, 2, 16, 1, 0, 2)
    assert not torch.equal(a1, a2)
    assert torch.equal(a1, rank_batches(64, 0, 1, 16, 1, 0, 2))


def test_data_smaller_than_one_global_batch():
    batches = rank_batches(5, 0, 1, batch_size=4, accum=1, rank=1, world_size=2)
    assert batches.shape == (1, 1, 4)
    assert set(batches.reshape(-1).tolist()) <= set(range(5))
