"""Upload compression, one file each, registered by name for the config's
`compression` section (see `base` for where the trainer applies it)."""

from fltool.algorithms.compression import qsgd, topk
from fltool.algorithms.compression.base import Compressor, dense_bytes

__all__ = ["Compressor", "dense_bytes", "qsgd", "topk"]
