"""Tensor data into an output file: kernel copies for unchanged bytes, bounded pieces otherwise.

A writer hands `write_tensors` its open output file and a list of (LazyTensor, target
DType). For each tensor, in order:

- same type in and out, bytes one plain range of the input file (LazyTensor.file_span):
  copied by the kernel (wconv.mapped.copy_range); the data never enters this process;
- same type, computed bytes (a permutation, a shard merge): computed a few rows at a time
  (LazyTensor.read_rows) on the thread pool, or for the rare computed tensor that cannot be
  made by rows, the stored-form array written in slices;
- anything else: pieces of whole rows (at most PIECE_ELEMENTS values, 8 MB of float32)
  are decoded to float32 and encoded as the target (wconv.codecs) on a small thread pool
  (wconv.parallel.ordered_map) while the calling thread writes the previous pieces. Pieces
  of a tensor with a file span are read one at a time (wconv.mapped.read_array: read, not
  mapped, so a source cut short is an error instead of SIGBUS), so neither a float32 copy of a
  tensor nor its whole input is ever resident; pieces of a computed tensor are computed from
  just the source rows they need.

Results are written in order, so the output is byte-identical whatever the thread count.
Writers keep their own headers: `before(i)` is called just before tensor i's first byte
(GGJT writes the tensor's header there, GGUF alignment padding) and `after(i)` after its
last.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np

from . import codecs, dtypes, libc
from .mapped import copy_range, read_array, start_writeback
from .parallel import default_workers, ordered_map

PIECE_ELEMENTS = 1 << 21  # float32 values per encoded piece: 8 MB of float32
# the largest row group (e.g. one attention head's rows) a computed tensor is made in, in values;
# a tensor whose groups are larger is built whole (none of the families' tensors are)
GROUP_LIMIT = 1 << 23
COPY_SLICE = 64 << 20  # bytes per write of an unchanged, computed tensor
# start writing the output to disk every this many bytes (mapped.start_writeback; kernel copies
# start their own range, so this mostly serves encoded pieces)
WRITEBACK = 64 << 20


@dataclass
class Result:
    """What write_tensors did for one tensor."""
    nbytes: int = 0
    copied: bool = False  # kernel copy
    overflowed: bool = False  # finite values became F16 infinities


@dataclass
class _Piece:
    index: int  # tensor position in the job list
    last: bool  # the tensor's final piece
    kind: str  # "copy" (span), "bytes" (array to write as is), "encode"
    data: object = None  # span tuple, uint8 array, or a () -> raw piece loader
    rows: tuple = (0, 0)  # shape of the float32 piece for "encode"


def pad(f, alignment: int) -> None:
    """Zero bytes up to the next multiple of `alignment` (absolute file offset)."""
    n = -f.tell() % alignment
    if n:
        f.write(b"\0" * n)


def write_tensors(f, jobs, *, threads: int | None = None, before=None, after=None,
                  piece_elements: int | None = None) -> list:
    """Write each (tensor, target DType) of `jobs` to the binary file `f`; a Result per job."""
    jobs = list(jobs)
    keep_freed_memory()
    piece_elements = piece_elements or PIECE_ELEMENTS
    results = [Result() for _ in jobs]
    threads = default_workers() if threads is None else max(1, int(threads))
    started = -1
    pieces = _pieces(jobs, piece_elements)
    flushed = f.tell()  # output bytes already handed to start_writeback
    # At most `threads` pieces exist at once: while the oldest is awaited (then written), the
    # others are being encoded, which keeps every core busy since writing is quick.
    for piece, out in ordered_map(_run, pieces, workers=threads, max_pending=threads):
        i = piece.index
        while started < i:  # tensors before this one (and this one) begin here
            started += 1
            if before is not None:
                before(started)
            if started < i and after is not None:  # (only possible for tensors with no pieces)
                after(started)
        r = results[i]
        if piece.kind == "copy":
            path, offset, nbytes = piece.data
            copy_range(path, offset, nbytes, f, file_size=piece.data.file_size,
                       what=f"tensor {jobs[i][0].name}")
            r.nbytes += nbytes
            r.copied = True
        else:
            data, overflow = out
            f.write(memoryview(data))
            r.nbytes += data.nbytes
            r.overflowed |= overflow
            del data
        del out
        if piece.last:
            _check(jobs[i], r)
            f.flush()  # the tensor is in the file (not in a buffer) before the next is read
            if f.tell() - flushed >= WRITEBACK:
                start_writeback(f, flushed, f.tell())
                flushed = f.tell()
            if after is not None:
                after(i)
        del piece  # not kept alive (with its source arrays) while the next piece is awaited
    for i in range(started + 1, len(jobs)):  # trailing tensors with no pieces (never: see _pieces)
        if before is not None:
            before(i)
        if after is not None:
            after(i)
    return results


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
_malloc_tuned = False


def keep_freed_memory() -> None:
    """Let freed piece buffers be reused instead of returned to the kernel (glibc only; else a no-op).

    Every piece allocates a few arrays of a few MB. By default glibc gives each its own mmap
    (or trims the heap after it is freed), so the next piece's arrays are fresh pages: faulted
    in, zeroed, and unmapped again, each unmap flushing the other core's TLB. Measured on a
    13.5 GB conversion that was a third of the system time. With mmap only above 32 MB (the
    largest threshold glibc takes) and no trimming below 256 MB, pieces reuse the same memory;
    the peak is unchanged (it is the live pieces either way). The process keeps up to 256 MB
    of freed heap afterwards. Thresholds the user set in the environment are left alone.
    """
    global _malloc_tuned
    if _malloc_tuned:
        return
    _malloc_tuned = True
    if _malloc_set_by_user():
        return
    import ctypes

    mallopt = libc.function("mallopt", ctypes.c_int, ctypes.c_int)  # (not glibc, e.g. musl: None)
    if mallopt is None:
        return
    mallopt(_M_MMAP_THRESHOLD, 32 << 20)
    mallopt(_M_TRIM_THRESHOLD, 256 << 20)


def _malloc_set_by_user() -> bool:
    """True if the environment already sets glibc's mmap or trim threshold (then it stands)."""
    env = os.environ
    tunables = env.get("GLIBC_TUNABLES", "")
    return ("MALLOC_MMAP_THRESHOLD_" in env or "MALLOC_TRIM_THRESHOLD_" in env
            or "glibc.malloc.mmap_threshold" in tunables or "glibc.malloc.trim_threshold" in tunables)


def _check(job, r: Result) -> None:
    t, target = job
    expected = target.nbytes(t.n_elements)
    if r.nbytes != expected:
        raise ValueError(f"tensor {t.name}: wrote {r.nbytes} bytes of {target.name} data, expected {expected}")


def _run(piece: _Piece):
    """Worker: the bytes of one piece (and whether F16 overflowed); copies are done by the writer."""
    if piece.kind == "copy":
        return piece, None
    if piece.kind == "bytes":
        return piece, (piece.data, False)
    load, src, target = piece.data
    raw = load()
    if src is target:  # computed rows, stored as they are
        return piece, (_stored_bytes(raw, target), False)
    out = codecs.converter(src, target)(raw, piece.rows)
    overflow = target is dtypes.F16 and src is not dtypes.F16 and _f16_overflow(out, src, raw)
    return piece, (out.view(np.uint8), overflow)


def _f16_overflow(out: np.ndarray, src, raw) -> bool:
    """True if finite source values became F16 infinities in `out`."""
    # One fast pass first: the largest magnitude field; only inf/NaN patterns reach 0x7C00.
    if int(np.bitwise_and(out.view(np.uint16), 0x7FFF).max(initial=0)) < 0x7C00:
        return False
    return bool(np.isinf(out).any()) and not bool(np.isinf(codecs.get(src).decode(raw)).any())


def _pieces(jobs, piece_elements: int):
    """The pieces of every job, in file order (generated lazily, on the calling thread)."""
    for i, (t, target) in enumerate(jobs):
        src = t.dtype
        if src == target:
            span = t.file_span()
            if span is not None and span[2] > 0:
                yield _Piece(i, True, "copy", span)
                continue
            yield from _stored_slices(i, t, target)
            continue
        yield from _encoded_pieces(i, t, target, piece_elements)


def _stored_bytes(raw, target) -> np.ndarray:
    raw = np.ascontiguousarray(raw)
    if target.quantized:
        return raw.reshape(-1).view(np.uint8)
    return raw.astype(target.storage.newbyteorder("<"), copy=False).reshape(-1).view(np.uint8)


def _stored_slices(i, t, target):
    e = t.n_elements // t.rows if t.rows else 0
    # pieces the size of an encoded piece's float32 (both the rows and their source bytes count)
    blocks = t.row_blocks(max(1, 4 * PIECE_ELEMENTS // max(1, target.nbytes(e)) * e), limit=GROUP_LIMIT)
    if blocks is not None:
        for a, b in blocks:
            yield _Piece(i, b >= t.rows, "encode", (lambda a=a, b=b: t.read_rows(a, b), target, target))
        return
    data = _stored_bytes(t.raw(), target)
    n = data.nbytes
    if n == 0:
        yield _Piece(i, True, "bytes", data)
        return
    for start in range(0, n, COPY_SLICE):
        yield _Piece(i, start + COPY_SLICE >= n, "bytes", data[start:start + COPY_SLICE])


def _encoded_pieces(i, t, target, piece_elements: int):
    src = t.dtype
    n = t.n_elements
    row = t.shape[-1] if t.shape else 1
    if n == 0:
        yield _Piece(i, True, "bytes", np.empty(0, np.uint8))
        return
    if 0 < row <= piece_elements:
        step, shape_of = (piece_elements // row) * row, (lambda k: (k // row, row))
    else:  # one row is larger than a piece: split it at block boundaries of both types
        unit = math.lcm(src.block, target.block)
        step, shape_of = max(unit, piece_elements // unit * unit), (lambda k: (1, k))
    span = t.file_span()
    blocks = t.row_blocks(piece_elements, row, limit=GROUP_LIMIT) if span is None else None
    if blocks is not None:  # a computed tensor: each piece from just the source rows it needs
        e = n // t.rows
        for a, b in blocks:
            yield _Piece(i, b >= t.rows, "encode", (lambda a=a, b=b: t.read_rows(a, b), src, target),
                         ((b - a) * e // row, row))
        return
    storage = src.storage.newbyteorder("<")
    whole = None
    if span is None:
        whole = np.ascontiguousarray(t.raw())
        whole = whole.reshape(-1) if not src.quantized else whole.reshape(-1).view(np.uint8)
    for start in range(0, n, step):
        k = min(step, n - start)
        lo, nb = src.nbytes(start), src.nbytes(k)
        if span is not None:
            path, offset, _ = span
            dtype = np.uint8 if src.quantized else storage
            load = (lambda p=path, o=offset + lo, b=nb, d=dtype, name=t.name, size=span.file_size:
                    read_array(p, o, b, d, file_size=size, what=f"tensor {name!r}"))
        elif src.quantized:
            load = (lambda w=whole, a=lo, b=lo + nb: w[a:b])
        else:
            load = (lambda w=whole, a=start, b=start + k: w[a:b])
        yield _Piece(i, start + k >= n, "encode", (load, src, target), shape_of(k))
