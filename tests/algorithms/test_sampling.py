"""Client sampling (McMahan et al. 2017, Algorithm 1: m = max(C K, 1) clients a round,
a random set S_t) and the seeds every random choice derives from."""

from __future__ import annotations

from fltool.algorithms.sampling import cohort_size, derive_seed, generator_for, sample_clients


def test_sample_clients_draws_round_c_k_distinct_clients():
    assert cohort_size(100, 0.1) == 10 and cohort_size(100, 0.001) == 1 and cohort_size(7, 1.0) == 7
    ids = sample_clients(100, 0.1, generator_for(0, "sample", 1))
    assert len(ids) == 10 == len(set(ids)) and ids == sorted(ids) and all(0 <= k < 100 for k in ids)
    assert ids == sample_clients(100, 0.1, generator_for(0, "sample", 1))
    assert ids != sample_clients(100, 0.1, generator_for(0, "sample", 2))
    assert sample_clients(7, 1.0, generator_for(0, "sample", 1)) == list(range(7))


def test_derived_seeds_depend_on_every_key_and_fit_torch():
    seeds = {derive_seed(0, "sample", 1), derive_seed(0, "sample", 2), derive_seed(1, "sample", 1), derive_seed(0, "batches", 1)}
    assert len(seeds) == 4 and all(0 <= s < 2**63 for s in seeds)
    assert derive_seed(0, "sample", 1) == derive_seed(0, "sample", 1)
