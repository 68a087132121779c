"""How a value appears in a one-line error: short, whatever the user passed (a huge
integer, a 500 KB string, a list of 100,000 items)."""

from __future__ import annotations

import math
from typing import Any


def show(value: Any) -> str:
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 200:
        # repr of a huge int is a screenful, or an error past 4300 digits
        return f"an integer of about {int(value.bit_length() * math.log10(2)) + 1} digits"
    if isinstance(value, str):
        return cut(repr(value), len(value), "characters")
    if value is None:
        return "null"
    try:
        text = repr(value)
    except ValueError:  # a list or mapping holding an int past 4300 digits
        text = "..."
    if isinstance(value, (list, dict)):
        text = cut(text, len(value), "items")
    return f"{text} ({type(value).__name__})" if not isinstance(value, (int, float)) else text


SHOWN_CHARS = 60  # of a value in an error line: a 500 KB string would drown the message


def cut(text: str, count: int, unit: str) -> str:
    return text if len(text) <= SHOWN_CHARS else f"{text[:SHOWN_CHARS]}... ({count:,} {unit})"
