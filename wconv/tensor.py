"""Lazy tensors: a description (name, dtype, shape, where the bytes are) until asked.

`raw()` returns the stored elements as a numpy array in the dtype's storage form
(float16, uint16 for bf16, uint8 blocks for quantised types), often a zero-copy
view of a memory-mapped file. `float32()` widens/dequantises. Transforms (shard
merges, permutations, transposes) are new LazyTensors wrapping a function of
their sources, so nothing is read until a writer asks for that one tensor.

A tensor can also be read a few rows (first-axis slices) at a time with `read_rows`:
from its file range when it has one, and for the transforms that keep rows apart (q/k
head permutations, shard merges) by computing just those rows from the sources' rows,
so writers never build a whole computed tensor either.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from . import codecs, dtypes
from .dtypes import DType
from .mapped import read_array


def to_float32(raw: np.ndarray, dt: DType, shape: tuple) -> np.ndarray:
    """Widen or dequantise a raw array of dtype `dt` to float32 of `shape` (wconv.codecs)."""
    return codecs.get(dt).decode(raw).reshape(shape)


class FileSpan(tuple):
    """(path, offset, nbytes) of a tensor's stored bytes in a file, and the file's size when the
    reader parsed it (file_size, or None): the writers read spans piece by piece long after the
    headers were parsed, and a file changed since then must be refused, not copied from."""

    def __new__(cls, path, offset: int, nbytes: int, file_size: int | None = None):
        span = super().__new__(cls, (path, offset, nbytes))
        span.file_size = file_size
        return span

    def __getnewargs__(self):  # copy and pickle
        return (*self, self.file_size)


@dataclass
class LazyTensor:
    name: str
    dtype: DType
    shape: tuple
    loader: Callable[[], np.ndarray] = field(repr=False)
    source: str = ""  # human-readable origin, e.g. "consolidated.00.pth:data/3"
    storage_key: object = None  # identifies the underlying storage (tied weights)
    # Where the stored bytes lie, if they are one plain little-endian C-order range of a file:
    # (path, offset, nbytes), or a function returning that or None (resolved on request).
    span: object = field(default=None, repr=False, compare=False)
    # For computed tensors that can be made a few rows at a time: (start, stop) -> the raw rows
    # [start, stop) (see read_rows); start and stop are multiples of row_group.
    rows_of: Callable | None = field(default=None, repr=False, compare=False)
    row_group: int = 1
    row_sources: tuple = field(default=(), repr=False, compare=False)  # the tensors rows_of reads

    def __post_init__(self):
        self.shape = tuple(int(s) for s in self.shape)

    @property
    def n_elements(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.dtype.nbytes(self.n_elements)

    def file_span(self) -> tuple | None:
        """(path, offset, nbytes) of the stored bytes when they are exactly this tensor's
        raw() bytes as one range of a file (so they can be copied or mapped piecewise),
        else None (computed tensors: permutations, shard merges, strided views...)."""
        span = self.span() if callable(self.span) else self.span
        if span is None or span[2] != self.nbytes:
            return None
        return span if isinstance(span, FileSpan) else FileSpan(*span)

    def raw(self) -> np.ndarray:
        """Stored elements, storage dtype, logical shape (quantised: flat uint8 blocks)."""
        arr = self.loader()
        if not self.dtype.quantized and tuple(arr.shape) != self.shape:
            arr = arr.reshape(self.shape)
        return arr

    @property
    def rows(self) -> int:
        return self.shape[0] if self.shape else 1

    def row_bytes(self) -> int:
        return self.nbytes // self.rows if self.rows else 0

    def rows_piecewise(self) -> bool:
        """True if read_rows reads only the rows asked for (not the whole tensor first): a file
        range, or rows computed from sources that are read by rows themselves."""
        if self.rows_of is not None:
            return all(s.rows_piecewise() for s in self.row_sources)
        return self.file_span() is not None

    def row_blocks(self, max_elements: int, multiple: int = 1, limit: int = 0) -> list | None:
        """(start, stop) first-axis row ranges to read this computed tensor by: each a whole
        number of row groups, a multiple of `multiple` values and, where one such unit allows, at
        most max_elements values. None if the tensor is not computed by rows from sources read by
        rows (read_rows would load them whole for every block), is empty, or one unit exceeds
        max(max_elements, limit) values."""
        if self.rows_of is None or not self.shape or self.n_elements == 0 or not self.rows_piecewise():
            return None
        e = self.n_elements // self.rows  # values per first-axis row
        unit = math.lcm(self.row_group, multiple // math.gcd(multiple, e))  # rows
        if unit * e > max(max_elements, limit):
            return None
        per = max(unit, max_elements // e // unit * unit)
        return [(a, min(self.rows, a + per)) for a in range(0, self.rows, per)]

    def read_rows(self, start: int, stop: int) -> np.ndarray:
        """Raw rows [start, stop) of the first axis: shape (stop - start, *shape[1:]) in the
        storage dtype, or for quantised types the rows' flat uint8 blocks. start and stop are
        multiples of row_group (or stop is the row count). Only those rows are read when
        rows_piecewise(); a file range is read just for them (wconv.mapped.read_array)."""
        if self.rows_of is not None:
            return self.rows_of(start, stop)
        span = self.file_span()
        if span is None:
            raw = self.raw()
            if self.dtype.quantized:
                rb = self.row_bytes()
                return np.ascontiguousarray(raw, dtype=np.uint8).reshape(-1)[start * rb:stop * rb]
            return raw.reshape(self.shape)[start:stop] if self.shape else raw.reshape(1)[start:stop]
        path, offset, _ = span
        rb = self.row_bytes()
        what, size = f"tensor {self.name!r}", span.file_size
        if self.dtype.quantized:
            return read_array(path, offset + start * rb, (stop - start) * rb, np.uint8, file_size=size, what=what)
        arr = read_array(path, offset + start * rb, (stop - start) * rb, self.dtype.storage.newbyteorder("<"),
                        file_size=size, what=what)
        return arr.reshape((stop - start, *self.shape[1:]))

    def float32(self) -> np.ndarray:
        return to_float32(self.raw(), self.dtype, self.shape)

    def float32_chunks(self, max_elements: int = 1 << 24, multiple_of: int = 1):
        """The tensor's float32 values in C order, as flat pieces of at most max_elements.

        Writers use this so that widening/dequantising temporaries stay at one piece (64 MB
        by default) instead of a few copies of the largest tensor. Piece sizes are multiples
        of `multiple_of` (e.g. a quantisation group) and of the dtype's block.
        """
        step = max(1, max_elements // (multiple_of * self.dtype.block)) * multiple_of * self.dtype.block
        blocks = None
        if not self.dtype.quantized and len(self.shape) >= 2 and self.rows:
            # a computed tensor: whole row groups at a time (one group even if above max_elements)
            blocks = self.row_blocks(max_elements, multiple_of * self.dtype.block,
                                     limit=self.row_group * (self.n_elements // self.rows))
        if blocks is not None:
            for a, b in blocks:
                block = self.read_rows(a, b)
                yield to_float32(np.ascontiguousarray(block).reshape(-1), self.dtype, (block.size,))
            return
        raw = self.raw()
        if self.dtype.quantized:
            flat = np.ascontiguousarray(raw, dtype=np.uint8).reshape(-1)
            per_block = self.dtype.block_bytes
            for start in range(0, self.n_elements, step):
                n = min(step, self.n_elements - start)
                lo = start // self.dtype.block * per_block
                yield to_float32(flat[lo:lo + n // self.dtype.block * per_block], self.dtype, (n,))
            return
        flat = raw.reshape(-1)  # a view for contiguous (e.g. memory-mapped) data
        for start in range(0, flat.size, step):
            piece = flat[start:start + step]
            yield to_float32(piece, self.dtype, piece.shape)

    def numpy(self) -> np.ndarray:
        """A numpy array of the values: raw for types numpy has, float32 otherwise."""
        if self.dtype.quantized or self.dtype is dtypes.BF16 or self.dtype.name.startswith("F8_"):
            return self.float32()
        return self.raw()

    # --- lazy transforms -------------------------------------------------
    def derive(self, fn: Callable[[np.ndarray], np.ndarray], *, name=None, shape=None,
               dtype: DType | None = None, float_input=False) -> "LazyTensor":
        """A new lazy tensor computed from this one's raw (or float32) data by `fn`."""
        src = self

        def load():
            return fn(src.float32() if float_input else src.raw())

        return LazyTensor(name or self.name, dtype or (dtypes.F32 if float_input else self.dtype),
                          tuple(shape) if shape is not None else self.shape, load, self.source)

    def derive_rows(self, fn: Callable[[np.ndarray], np.ndarray], group: int) -> "LazyTensor":
        """A lazy tensor of the same type and shape whose every block of `group` rows is
        fn(those raw rows of this one), fn mapping any whole number of groups to as many rows
        (e.g. a per-head row permutation). Writers can then read it a few groups at a time."""
        src = self
        if not self.shape or group <= 0 or self.shape[0] % group:
            raise ValueError(f"{self.name}: {self.shape[0] if self.shape else 0} rows are not groups of {group}")

        def load():
            if not src.dtype.quantized:
                return fn(src.raw())
            return fn(np.ascontiguousarray(src.raw(), dtype=np.uint8).reshape(-1)).reshape(-1)

        return LazyTensor(self.name, self.dtype, self.shape, load, self.source,
                          rows_of=lambda a, b: fn(src.read_rows(a, b)), row_group=math.lcm(group, self.row_group),
                          row_sources=(src,))

    def renamed(self, name: str) -> "LazyTensor":
        return LazyTensor(name, self.dtype, self.shape, self.loader, self.source, self.storage_key, self.span,
                          self.rows_of, self.row_group, self.row_sources)

    @staticmethod
    def from_array(name: str, arr: np.ndarray, dtype: DType | None = None, source="memory") -> "LazyTensor":
        arr = np.asarray(arr)
        dt = dtype or dtype_of_numpy(arr.dtype)
        return LazyTensor(name, dt, arr.shape, lambda: arr, source)

    @staticmethod
    def concat(name: str, parts: Sequence["LazyTensor"], axis: int) -> "LazyTensor":
        """Lazily concatenate shards (Meta model-parallel checkpoints)."""
        parts = list(parts)
        if len(parts) == 1:
            return parts[0].renamed(name)
        dt = parts[0].dtype
        shape = list(parts[0].shape)
        shape[axis] = sum(p.shape[axis] for p in parts)

        def load():
            return np.concatenate([p.raw() for p in parts], axis=axis)

        rows_of, group = None, 1
        if not dt.quantized and len(shape) >= 2:
            group = math.lcm(*(p.row_group for p in parts))
            if axis == 0 and group == 1:
                starts = [0]
                for p in parts:
                    starts.append(starts[-1] + p.shape[0])

                def rows_of(a, b):
                    pieces = [p.read_rows(max(a, lo) - lo, min(b, hi) - lo)
                              for p, lo, hi in zip(parts, starts, starts[1:]) if lo < b and a < hi]
                    return pieces[0] if len(pieces) == 1 else np.concatenate(pieces, axis=0)
            elif axis > 0:
                def rows_of(a, b):
                    return np.concatenate([p.read_rows(a, b) for p in parts], axis=axis)

        return LazyTensor(name, dt, tuple(shape), load, "+".join(p.source for p in parts),
                          rows_of=rows_of, row_group=group if rows_of else 1, row_sources=tuple(parts))


_NUMPY_TO_DTYPE = {
    np.dtype(np.float64): dtypes.F64, np.dtype(np.float32): dtypes.F32, np.dtype(np.float16): dtypes.F16,
    np.dtype(np.int64): dtypes.I64, np.dtype(np.int32): dtypes.I32, np.dtype(np.int16): dtypes.I16,
    np.dtype(np.int8): dtypes.I8, np.dtype(np.uint64): dtypes.U64, np.dtype(np.uint32): dtypes.U32,
    np.dtype(np.uint16): dtypes.U16, np.dtype(np.uint8): dtypes.U8, np.dtype(np.bool_): dtypes.BOOL,
    np.dtype(np.complex64): dtypes.C64, np.dtype(np.complex128): dtypes.C128,
}


def dtype_of_numpy(np_dtype) -> DType:
    return _NUMPY_TO_DTYPE[np.dtype(np_dtype).newbyteorder("=")]
