"""Differential privacy of the clients' updates: the mechanism (clipping, noise,
adaptive clipping) in `mechanism`, the accountant in `accountant` (imported only by runs
that use DP: it needs dp-accounting and scipy)."""

from fltool.algorithms.privacy.mechanism import Privacy, clip_to_norm, gaussian_like, os_gaussian

__all__ = ["Privacy", "clip_to_norm", "gaussian_like", "os_gaussian"]
