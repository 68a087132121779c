"""IDX files (MNIST's format), read with torch alone.

`import torchvision` costs seconds more than torch, and reading MNIST needs none of it:
an IDX file is a 4-byte magic number (two zero bytes, a type code, the number of
dimensions), one big-endian uint32 per dimension, then the values, big-endian, row-major.
Sizes are checked exactly, so a file cut short by an interrupted copy or extraction is
an error here, not a tensor of the wrong shape later.
"""

from __future__ import annotations

import math
import os
import struct
import sys
from pathlib import Path

import torch

# type code -> dtype, as in the format's description (LeCun's MNIST page)
_TYPES = {
    0x08: torch.uint8,
    0x09: torch.int8,
    0x0B: torch.int16,
    0x0C: torch.int32,
    0x0D: torch.float32,
    0x0E: torch.float64,
}


class IdxError(ValueError):
    """The file is not a whole IDX file; the message is one line, without the path."""


def read_idx(path: Path | str) -> torch.Tensor:
    """The tensor stored in the IDX file at `path` (uncompressed), in native byte order."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        magic = f.read(4)
        if len(magic) < 4 or magic[0] != 0 or magic[1] != 0 or magic[2] not in _TYPES or magic[3] == 0:
            raise IdxError(f"not an IDX file (magic number {magic.hex() or 'missing'})")
        dtype, ndim = _TYPES[magic[2]], magic[3]
        header = 4 + 4 * ndim
        if size < header:
            raise IdxError(f"truncated: {size} bytes, shorter than its {header}-byte header")
        dims = struct.unpack(f">{ndim}I", f.read(4 * ndim))
        itemsize = torch.empty((), dtype=dtype).element_size()
        expected = header + math.prod(dims) * itemsize
        if size != expected:
            what = "truncated" if size < expected else "trailing bytes"
            raise IdxError(f"{what}: {size} bytes, expected {expected} for shape {list(dims)}")
        # readinto a preallocated buffer: one copy of the data, not bytes + bytearray
        buf = bytearray(expected - header)
        if f.readinto(buf) != len(buf):
            raise IdxError("truncated while reading (the file changed)")
    if not buf:
        return torch.empty(dims, dtype=dtype)
    values = torch.frombuffer(buf, dtype=dtype)
    if itemsize > 1 and sys.byteorder == "little":
        values = values.view(torch.uint8).view(-1, itemsize).flip(1).contiguous().view(dtype).view(-1)
    return values.view(dims)
