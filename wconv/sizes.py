"""Byte counts given on the command line: --max-shard-size (HF's spellings) and --split-max-size
(llama.cpp's). One parser: decimal units with or without B (5G = 5GB = 5 * 10**9, as both tools
count), binary ones spelled KiB/MiB/GiB/TiB."""
from __future__ import annotations

import re

from .errors import UsageError

_UNITS = {"": 1, "B": 1, **{p + s: 10 ** (3 * i) for i, p in enumerate("KMGT", 1) for s in ("", "B")},
          **{p + "IB": 2 ** (10 * i) for i, p in enumerate("KMGT", 1)}}
_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*")


def parse_size(value, option: str, *, fractions: bool = True) -> int:
    """Bytes from an int or a string such as "5GB", "500M", "64KiB" or "1000"; `option` names the
    flag in errors; fractions=False refuses "1.5G" (llama.cpp's tools take whole numbers)."""
    if isinstance(value, int) and not isinstance(value, bool):
        n = value
    else:
        m = _SIZE.fullmatch(str(value))
        unit = m.group(2).upper() if m else None
        if unit not in _UNITS or (not fractions and "." in m.group(1)):
            raise UsageError(None, f"{option} {value!r}: expected a size such as 5GB, 500M or 1000000")
        n = int(float(m.group(1)) * _UNITS[unit]) if "." in m.group(1) else int(m.group(1)) * _UNITS[unit]
    if n <= 0:
        raise UsageError(None, f"{option} {value!r}: the size must be positive")
    return n
