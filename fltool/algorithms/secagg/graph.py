"""The neighbour graph: who shares keys, masks and secret shares with whom.

SecAgg (Bonawitz et al. 2017) uses the complete graph: every client masks with, and
shares its secrets among, all others, so the per-client cost grows with n and the total
with n^2. SecAgg+ (Bell et al. 2020) uses a random k-regular graph with k = O(log n),
which keeps privacy against an honest-but-curious server with high probability while
each client does O(k) work. The server picks the graph (it is public); its randomness
comes from `secrets`, not the experiment seed, since a predictable graph would help
a colluding adversary choose whom to corrupt.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence


def neighbour_graph(ids: Sequence[int], k: int) -> dict[int, set[int]]:
    """A k-regular graph on `ids` (the complete graph when k >= n - 1): a Harary graph
    (ring with k//2 neighbours on each side, plus the opposite vertex when k is odd)
    over a random permutation of the clients."""
    ids = list(ids)
    n = len(ids)
    if k >= n - 1:
        return {u: set(ids) - {u} for u in ids}
    if k < 1:
        raise ValueError("secagg: a client needs at least one neighbour")
    if k % 2 == 1 and n % 2 == 1:
        raise ValueError(f"secagg: no {k}-regular graph on {n} clients (k odd needs n even); use an even num_shares")
    order = ids[:]
    secrets.SystemRandom().shuffle(order)
    graph: dict[int, set[int]] = {u: set() for u in ids}
    for i, u in enumerate(order):
        for j in range(1, k // 2 + 1):
            graph[u].add(order[(i + j) % n])
            graph[u].add(order[(i - j) % n])
        if k % 2 == 1:
            graph[u].add(order[(i + n // 2) % n])
    return graph


def default_neighbours(n: int) -> int:
    """SecAgg+'s k = O(log n): the smallest even k >= 3 log2(n), or n - 1 for small n."""
    k = 2
    while (1 << (k // 3)) < n:
        k += 2
    return min(k, n - 1)
