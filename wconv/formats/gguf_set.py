"""GGUF split sets in llama.cpp's gguf-split layout: names, keys, and the checks a reader makes.

A set is `PREFIX-00001-of-0000N.gguf` ... `PREFIX-0000N-of-0000N.gguf` (llama_split_path's
"%s-%05d-of-%05d.gguf", parts numbered from 1 in the name, from 0 in `split.no`). The first
part holds every metadata key; each part holds its own tensors (infos and data, offsets
relative to its own data section) and the keys `split.no` (UINT16), `split.count` (UINT16)
and `split.tensors.count` (INT32, the tensors of the whole set). llama.cpp loads a set from
its first part only, finds the others by name, and checks each part's `split.no` and the
tensor total; the checks here are the same, made before any tensor is read, so a broken set
is one line naming the part at fault.

This module only names and checks; it reads nothing itself (gguf_io reads the headers and
passes them in), so gguf_io and wconv.gguf_split can both use it.
"""
from __future__ import annotations

import os
import re

from ..errors import FormatError

SPLIT_NO, SPLIT_COUNT, SPLIT_TENSORS = "split.no", "split.count", "split.tensors.count"
SPLIT_KEYS = (SPLIT_NO, SPLIT_COUNT, SPLIT_TENSORS)
SPLIT_TYPES = {SPLIT_NO: "UINT16", SPLIT_COUNT: "UINT16", SPLIT_TENSORS: "INT32"}
PART_NAME = re.compile(r"^(?P<prefix>.+)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")
MAX_PARTS = 0xFFFF  # split.count is a UINT16


def part_path(prefix: str, index: int, count: int) -> str:
    """Path of part `index` (0-based, as split.no) of a `count`-part set: llama_split_path."""
    return f"{prefix}-{index + 1:05d}-of-{count:05d}.gguf"


def prefix_of(path: str, index: int, count: int) -> str | None:
    """The set prefix of `path` if it is named as part `index` of `count`, else None (llama_split_prefix)."""
    tail = f"-{index + 1:05d}-of-{count:05d}.gguf"
    return path[:-len(tail)] if len(path) > len(tail) and path.endswith(tail) else None


def declared_count(h) -> int:
    """split.count of a header (0 or 1: not part of a set)."""
    count = h.kv.get(SPLIT_COUNT, 0)
    return count if isinstance(count, int) and not isinstance(count, bool) else 0


def part_paths(first: str, h) -> list:
    """Every part of the set whose first part `first` (header `h`) is; checks what llama.cpp checks
    before it opens the other parts. A file that is not in a set gives [first]."""
    count = declared_count(h)
    if count <= 1:
        return [first]
    _check_key(first, h, SPLIT_COUNT)
    _check_key(first, h, SPLIT_NO)
    no = h.kv.get(SPLIT_NO, 0)
    if no != 0:
        prefix = prefix_of(first, no, count)
        named = f" ({os.path.basename(part_path(prefix, 0, count))})" if prefix else ""
        raise FormatError(first, f"this is part {no + 1} of a {count}-part GGUF split set; give its first "
                                 f"part{named}, from which llama.cpp and wconv load the set")
    prefix = prefix_of(first, 0, count)
    if prefix is None:
        raise FormatError(first, f"metadata says this is the first of {count} GGUF split parts, but the file is "
                                 f"not named NAME-00001-of-{count:05d}.gguf, so its other parts cannot be found")
    paths = [part_path(prefix, i, count) for i in range(count)]
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise FormatError(missing[0], f"part {paths.index(missing[0]) + 1} of the {count}-part GGUF split set "
                                      f"{os.path.basename(first)} is missing{more}")
    return paths


def _check_key(path: str, h, key: str) -> None:
    kind = h.kv_types.get(key, (None,))[0]
    if kind is None:
        raise FormatError(path, f"GGUF split part without {key} (llama.cpp needs it to load the set)")
    if kind != SPLIT_TYPES[key]:
        raise FormatError(path, f"{key} is {kind}; llama.cpp reads it as {SPLIT_TYPES[key]}")


def check_parts(paths: list, headers: list) -> None:
    """The checks llama.cpp makes on a loaded set: each part's split.no, no tensor twice, the total."""
    names = {}
    for i, (p, h) in enumerate(zip(paths, headers)):
        _check_key(p, h, SPLIT_NO)
        if h.kv[SPLIT_NO] != i:
            raise FormatError(p, f"split.no is {h.kv[SPLIT_NO]}, but the file is named as part {i + 1} "
                                 f"(split.no {i}) of its set")
        if i and declared_count(h) not in (0, len(paths)):
            raise FormatError(p, f"split.count is {declared_count(h)}, but the first part says {len(paths)}")
        for info in h.tensors:
            if info.name in names:
                raise FormatError(p, f"tensor {info.name!r} is also in {os.path.basename(names[info.name])}")
            names[info.name] = p
    _check_key(paths[0], headers[0], SPLIT_TENSORS)
    want = headers[0].kv[SPLIT_TENSORS]
    if want != len(names):
        raise FormatError(paths[0], f"split.tensors.count says {want} tensors, the {len(paths)} parts hold "
                                    f"{len(names)}")
