"""Shamir secret sharing over the prime field GF(2^521 - 1).

Why this field: the secrets are 32-byte seeds and X25519 private keys (256 bits), so the
field must hold every 256-bit integer; 2^521 - 1 is a Mersenne prime (no prime search,
no table), and Python's integers make the arithmetic exact. Why our own: the project
uses only the `cryptography` package, which has no secret sharing.

A share is (x, y) with x >= 1 the shareholder's point; any `threshold` distinct shares
reconstruct the secret by Lagrange interpolation at 0, and any threshold - 1 shares are
consistent with every secret (the tests construct the polynomial for any candidate).
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence

PRIME = 2**521 - 1
SHARE_BYTES = 4 + 66  # x as uint32, y as 66 big-endian bytes (521 bits)

Share = tuple[int, int]


def _eval(coeffs: Sequence[int], x: int) -> int:
    """Horner's rule mod PRIME."""
    y = 0
    for c in reversed(coeffs):
        y = (y * x + c) % PRIME
    return y


def split(secret: bytes, xs: Sequence[int], threshold: int) -> list[Share]:
    """Shares of `secret` at the points `xs` (distinct, >= 1), any `threshold` of which
    reconstruct it. The coefficients come from `secrets`, never from an experiment seed."""
    if not 1 <= threshold <= len(xs):
        raise ValueError(f"threshold {threshold} must be in [1, {len(xs)}]")
    if len(set(xs)) != len(xs) or min(xs) < 1 or max(xs) >= PRIME:
        raise ValueError("share points must be distinct and in [1, PRIME)")
    value = int.from_bytes(secret, "big")
    if value >= PRIME:
        raise ValueError("secret too large for the field")
    coeffs = [value] + [secrets.randbelow(PRIME) for _ in range(threshold - 1)]
    return [(x, _eval(coeffs, x)) for x in xs]


def interpolate(shares: Sequence[Share], at: int = 0) -> int:
    """The value at `at` of the unique polynomial of degree < len(shares) through them."""
    xs = [x for x, _ in shares]
    if len(set(xs)) != len(xs):
        raise ValueError("duplicate share points")
    total = 0
    for i, (xi, yi) in enumerate(shares):
        num, den = 1, 1
        for j, (xj, _) in enumerate(shares):
            if j != i:
                num = num * (at - xj) % PRIME
                den = den * (xi - xj) % PRIME
        total = (total + yi * num * pow(den, -1, PRIME)) % PRIME
    return total


def reconstruct(shares: Sequence[Share], length: int = 32) -> bytes:
    """The secret from >= threshold shares (extra shares are harmless; fewer give
    an unrelated value, which callers prevent by counting first)."""
    value = interpolate(shares, 0)
    if value >= 1 << (8 * length):
        raise ValueError("shares do not reconstruct a secret of this length (too few or corrupted)")
    return value.to_bytes(length, "big")


def encode_share(share: Share) -> bytes:
    return share[0].to_bytes(4, "big") + share[1].to_bytes(66, "big")


def decode_share(data: bytes) -> Share:
    if len(data) != SHARE_BYTES:
        raise ValueError("bad share length")
    return int.from_bytes(data[:4], "big"), int.from_bytes(data[4:], "big")
