"""Sizes and rates, parsed and printed in one place.

Sizes are written the way llama.cpp and most tools take them: ``6GiB``, ``512MiB``, ``1.5GB``, ``1000``
(bytes; binary and decimal prefixes both understood).  Byte counts print with one decimal in the largest
binary unit that fits (``24.5 KiB``); rates print in decimal units, as link speeds are quoted.
"""

from __future__ import annotations

import math
import re

from fate.errors import UsageError

_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([kmgt]?i?b?)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3,
          "t": 1000**4, "tb": 1000**4, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
          "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}
_BINARY = (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10))


class SizeError(UsageError):
    """Text that is not a size."""


def parse_size(text: str) -> int:
    """'6GiB', '512MiB', '1.5GB', '1000' → bytes; anything else is a :class:`SizeError`."""
    m = _SIZE.match(str(text))
    if not m or (m.group(2) or "").lower() not in _UNITS:
        raise SizeError(f"{text!r} is not a size; write it like 6GiB, 512MiB or 1.5GB")
    return int(float(m.group(1)) * _UNITS[(m.group(2) or "").lower()])


def format_size(n: float, *, ceil: bool = False) -> str:
    """Bytes with one decimal in the largest binary unit that fits ('24.5 KiB', '1.2 GiB', '512 B');
    ``ceil`` rounds up, for minimums, so that asking for the printed figure is always enough."""
    if not math.isfinite(n):
        return f"{n} B"
    n = int(math.ceil(n) if ceil else round(n))
    if abs(n) < 1024:
        return f"{n} B"
    for unit, scale in _BINARY:
        if abs(n) >= scale:
            tenths = -(-n * 10 // scale) if ceil else round(n * 10 / scale)
            return f"{tenths // 10}.{tenths % 10} {unit}" if tenths >= 0 else f"-{format_size(-n)}"
    raise AssertionError("unreachable")


def format_rate(bytes_per_s: float) -> str:
    """Decimal units, as link speeds are quoted: 12e9 → '12 GB/s', 80e6 → '80 MB/s'."""
    for unit, scale in (("TB/s", 1e12), ("GB/s", 1e9), ("MB/s", 1e6), ("KB/s", 1e3)):
        if bytes_per_s >= scale:
            return f"{bytes_per_s / scale:.3g} {unit}"
    return f"{bytes_per_s:.3g} B/s"
