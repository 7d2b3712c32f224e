"""Split a GGUF into a llama.cpp split set, and merge a set back into one file, by kernel copies.

The layout is gguf-split's (tools/gguf-split in llama.cpp; names and keys in
wconv.formats.gguf_set): the first part carries every metadata key of the input, then
`split.no`, `split.count`, `split.tensors.count`; the other parts only those three. Each part
lists its own tensors, offsets relative to its own data section, every tensor padded to the
alignment. Shards are planned as gguf-split does: tensors in file order, a new part when the
next tensor (padded) would take the tensor bytes past --split-max-size, or every
--split-max-tensors tensors. Unlike gguf-split, a tensor larger than the limit gets a part of
its own even when it comes first (gguf-split stops there), and an input alignment other than
32 is kept and declared in every part (gguf-split pads every part to 32 but declares the
input's alignment in the first only).

A merge writes the first part's metadata without the split keys, then every part's tensor
infos and data: splitting a llama.cpp-laid-out GGUF and merging the parts gives the original
file byte for byte. (gguf-split --merge keeps the split keys, with split.count 0.)

Headers are assembled from the input's own bytes (metadata entries and tensor infos are
copied, only offsets are rewritten), so nothing wconv does not interpret is lost; tensor
data travels by wconv.mapped.copy_range and never enters memory. Outputs are atomic: all
parts of a set appear together or none does (wconv.atomic.atomic_files), and each output is
re-read and checked before it replaces anything.
"""
from __future__ import annotations

import os
import struct

from . import sizes
from .atomic import atomic_files, atomic_path
from .errors import FormatError, UsageError, WconvError
from .formats import gguf_io, gguf_set
from .mapped import copy_range, read_bytes
from .progress import progress

GGUF_VERSION = 3


def parse_size(text) -> int:
    """Bytes of a --split-max-size: "5G", "500M", "64K", "5GB" or "1000000" (decimal, as gguf-split counts)."""
    return sizes.parse_size(text, "--split-max-size", fractions=False)


def plan_split(sizes, max_bytes: int | None = None, max_tensors: int | None = None, *,
               alignment: int = gguf_io.DEFAULT_ALIGNMENT, empty_first: bool = False) -> list:
    """Groups of tensor indices, one group per part, in order (gguf-split's rule, module docstring).

    sizes: tensor byte sizes in file order. empty_first: a first part with metadata only
    (gguf-split --no-tensor-first-split).
    """
    if not max_bytes and not max_tensors:
        raise UsageError(None, "give --split-max-size or --split-max-tensors")
    if max_tensors is not None and max_tensors < 1:
        raise UsageError(None, f"--split-max-tensors must be at least 1, got {max_tensors}")
    groups = [[]] if empty_first else []
    current, used = None, 0
    for i, n in enumerate(sizes):
        padded = -(-n // alignment) * alignment
        full = current is not None and ((max_bytes and used + padded > max_bytes)
                                        or (max_tensors and len(current) >= max_tensors))
        if current is None or full:
            current, used = [], 0
            groups.append(current)
        current.append(i)
        used += padded
    if not groups or (empty_first and len(groups) == 1):
        groups.append([])
    if len(groups) > gguf_set.MAX_PARTS:
        raise UsageError(None, f"the plan needs {len(groups)} parts; a split set holds at most {gguf_set.MAX_PARTS}")
    return groups


# --- reading the input: one file or a set, as (part path, header, raw tensor info) --------

class _Source:
    """An input GGUF (one file or a split set): metadata entries and tensors as stored."""

    def __init__(self, path):
        self.path = os.fspath(path)
        if not os.path.isfile(self.path):
            raise FormatError(self.path, "no such file")
        self.parts = gguf_io.read_set(self.path)
        first, h, size = self.parts[0]
        self.header, self.endian, self.alignment = h, h.endian, h.alignment
        raw = read_bytes(first, 0, h.info_span[0], file_size=size, what="GGUF metadata")
        # Every metadata entry of the first part except the split keys, byte for byte.
        self.entries = [raw[a:b] for k, (a, b) in h.kv_spans.items() if k not in gguf_set.SPLIT_KEYS]
        self.has_alignment_key = "general.alignment" in h.kv
        self.tensors = []  # (part path, TensorInfo, info bytes without the offset)
        self.sizes = {part: psize for part, _, psize in self.parts}  # as parsed: copies check them
        for part, ph, psize in self.parts:
            infos = read_bytes(part, ph.info_span[0], ph.info_span[1] - ph.info_span[0], file_size=psize,
                               what="GGUF tensor infos")
            for info, blob in zip(ph.tensors, _info_blobs(infos, ph.endian)):
                self.tensors.append((part, info, blob))

    @property
    def files(self) -> list:
        return [p for p, _, _ in self.parts]


def _info_blobs(buf: bytes, e: str):
    """Each tensor info's bytes up to (not including) its 8-byte offset."""
    pos = 0
    while pos < len(buf):
        (n,) = struct.unpack_from(e + "Q", buf, pos)
        (n_dims,) = struct.unpack_from(e + "I", buf, pos + 8 + n)
        end = pos + 8 + n + 4 + 8 * n_dims + 4
        yield buf[pos:end]
        pos = end + 8


# --- writing -----------------------------------------------------------------------------

def _padded(n: int, alignment: int) -> int:
    return -(-n // alignment) * alignment


def _write_part(f, src: _Source, entries: list, tensors: list, bar) -> None:
    """One GGUF: header with `entries` and `tensors`' infos (fresh offsets), then their data."""
    e, align = src.endian, src.alignment
    infos, offset = [], 0
    for _, info, blob in tensors:
        infos.append(blob + struct.pack(e + "Q", offset))
        offset += _padded(info.nbytes, align)
    head = b"".join([gguf_io.GGUF_MAGIC, struct.pack(e + "IQQ", GGUF_VERSION, len(tensors), len(entries)),
                     *entries, *infos])
    f.write(head + b"\0" * (_padded(len(head), align) - len(head) if tensors else 0))
    for part, info, _ in tensors:
        copy_range(part, info.offset, info.nbytes, f, file_size=src.sizes[part], what=f"tensor {info.name!r}")
        f.write(b"\0" * (_padded(info.nbytes, align) - info.nbytes))
        bar.update(info.nbytes, info.name)


def _split_entries(src: _Source, no: int, count: int, first: bool) -> list:
    e = src.endian
    keys = [gguf_io.pack_kv(gguf_set.SPLIT_NO, "UINT16", None, no, e),
            gguf_io.pack_kv(gguf_set.SPLIT_COUNT, "UINT16", None, count, e),
            gguf_io.pack_kv(gguf_set.SPLIT_TENSORS, "INT32", None, len(src.tensors), e)]
    if first:
        return src.entries + keys
    if src.alignment != gguf_io.DEFAULT_ALIGNMENT:  # the other parts are read with 32 unless told
        keys.append(gguf_io.pack_kv("general.alignment", "UINT32", None, src.alignment, e))
    return keys


def split_prefix(out: str) -> str:
    """gguf-split's output prefix; a trailing .gguf is dropped (x.gguf -> x-00001-of-00002.gguf)."""
    out = os.fspath(out)
    return out[:-5] if out.lower().endswith(".gguf") else out


def output_paths(out_prefix, n_parts: int, single=None) -> list:
    """The files a split into `n_parts` writes (`single` for one part, if given)."""
    if n_parts == 1 and single is not None:
        return [os.fspath(single)]
    prefix = split_prefix(out_prefix)
    return [gguf_set.part_path(prefix, i, n_parts) for i in range(n_parts)]


def split(src, out_prefix, *, max_bytes=None, max_tensors=None, no_tensor_first_split: bool = False,
          single=None, force: bool = False, quiet: bool = False, dry_run: bool = False, inputs=()) -> list:
    """Write `src` (a GGUF, or the first part of a set) as a split set PREFIX-0000i-of-0000N.gguf.

    single: if the plan has one part only, write it to this path as a plain GGUF without split
    keys instead (what llama.cpp's converter does). dry_run: print the plan, write nothing.
    inputs: further files the outputs may not replace. Returns the paths (to be) written.
    """
    s = _Source(src)
    sizes = [info.nbytes for _, info, _ in s.tensors]
    groups = plan_split(sizes, max_bytes, max_tensors, alignment=s.alignment, empty_first=no_tensor_first_split)
    paths = output_paths(out_prefix, len(groups), single)
    if dry_run:
        print("\n".join(describe_plan(groups, sizes, paths)))
        return paths
    if len(groups) == 1 and single is not None:
        _merge_source(s, single, force=force, quiet=quiet, inputs=inputs)
        return paths
    with atomic_files(paths, force=force, inputs=[*s.files, *inputs], own_output=_own_gguf) as tmp:
        with progress(sum(i.nbytes for _, i, _ in s.tensors), "splitting GGUF", quiet=quiet) as bar:
            for no, (path, group) in enumerate(zip(paths, groups)):
                with open(os.path.join(tmp, os.path.basename(path)), "wb") as f:
                    _write_part(f, s, _split_entries(s, no, len(groups), no == 0),
                                [s.tensors[i] for i in group], bar)
        _check_written(s, os.path.join(tmp, os.path.basename(paths[0])), paths[0])
    return paths


def merge(first_part, out, *, force: bool = False, quiet: bool = False) -> str:
    """Write the split set whose first part is `first_part` as one GGUF `out` (kernel copies)."""
    s = _Source(first_part)
    if len(s.parts) == 1:
        raise UsageError(s.path, "not the first part of a GGUF split set (no split.count above 1); nothing to merge")
    return _merge_source(s, out, force=force, quiet=quiet)


def _merge_source(s: _Source, out, *, force: bool, quiet: bool, inputs=()) -> str:
    out = os.fspath(out)
    with atomic_path(out, force=force, inputs=[*s.files, *inputs], own_output=_own_gguf) as tmp:
        with open(tmp, "wb") as f, progress(sum(i.nbytes for _, i, _ in s.tensors), "merging GGUF",
                                            quiet=quiet) as bar:
            _write_part(f, s, s.entries, s.tensors, bar)
        _check_written(s, tmp, out, whole_set=False)
    return out


def _check_written(s: _Source, first: str, out: str, whole_set: bool = True) -> None:
    """Re-read the output's headers: same tensors, same types and sizes, in the same order."""
    written = gguf_io.read_set(first, whole_set=whole_set)
    got = [(i.name, i.dims, i.dtype, i.nbytes) for _, h, _ in written for i in h.tensors]
    want = [(i.name, i.dims, i.dtype, i.nbytes) for _, i, _ in s.tensors]
    if got != want:
        raise FormatError(out, "the written GGUF's tensors do not match the input's; nothing written")


def _own_gguf(path):
    """--force replaces GGUF files only (atomic's own_output contract)."""
    from .sniff import sniff

    try:
        return None if sniff(path) == "gguf" else "it is not a GGUF file"
    except WconvError:  # unreadable: not ours to replace
        return "it is not a GGUF file"


def describe_plan(groups: list, sizes: list, paths: list) -> list:
    """Lines describing a split plan, as gguf-split --dry-run prints it."""
    lines = [f"n_split: {len(groups)}"]
    for path, group in zip(paths, groups):
        lines.append(f"{os.path.basename(path)}: n_tensors = {len(group)}, "
                     f"tensor bytes = {sum(sizes[i] for i in group):,}")
    return lines
