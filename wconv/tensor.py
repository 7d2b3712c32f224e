"""Lazy tensors: a description (name, dtype, shape, where the bytes are) until asked.

`raw()` returns the stored elements as a numpy array in the dtype's storage form
(float16, uint16 for bf16, uint8 blocks for quantised types), often a zero-copy
view of a memory-mapped file. `float32()` widens/dequantises. Transforms (shard
merges, permutations, transposes) are new LazyTensors wrapping a function of
their sources, so nothing is read until a writer asks for that one tensor.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from . import codecs, dtypes
from .dtypes import DType


def to_float32(raw: np.ndarray, dt: DType, shape: tuple) -> np.ndarray:
    """Widen or dequantise a raw array of dtype `dt` to float32 of `shape` (wconv.codecs)."""
    return codecs.get(dt).decode(raw).reshape(shape)


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
        if span is not None and span[2] != self.nbytes:
            return None
        return span

    def raw(self) -> np.ndarray:
        """Stored elements, storage dtype, logical shape (quantised: flat uint8 blocks)."""
        arr = self.loader()
        if not self.dtype.quantized and tuple(arr.shape) != self.shape:
            arr = arr.reshape(self.shape)
        return arr

    def float32(self) -> np.ndarray:
        return to_float32(self.raw(), self.dtype, self.shape)

    def float32_chunks(self, max_elements: int = 1 << 24, multiple_of: int = 1):
        """The tensor's float32 values in C order, as flat pieces of at most max_elements.

        Writers use this so that widening/dequantising temporaries stay at one piece (64 MB
        by default) instead of a few copies of the largest tensor. Piece sizes are multiples
        of `multiple_of` (e.g. a quantisation group) and of the dtype's block.
        """
        raw = self.raw()
        step = max(1, max_elements // (multiple_of * self.dtype.block)) * multiple_of * self.dtype.block
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

    def renamed(self, name: str) -> "LazyTensor":
        return LazyTensor(name, self.dtype, self.shape, self.loader, self.source, self.storage_key, self.span)

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

        return LazyTensor(name, dt, tuple(shape), load, "+".join(p.source for p in parts))


_NUMPY_TO_DTYPE = {
    np.dtype(np.float64): dtypes.F64, np.dtype(np.float32): dtypes.F32, np.dtype(np.float16): dtypes.F16,
    np.dtype(np.int64): dtypes.I64, np.dtype(np.int32): dtypes.I32, np.dtype(np.int16): dtypes.I16,
    np.dtype(np.int8): dtypes.I8, np.dtype(np.uint64): dtypes.U64, np.dtype(np.uint32): dtypes.U32,
    np.dtype(np.uint16): dtypes.U16, np.dtype(np.uint8): dtypes.U8, np.dtype(np.bool_): dtypes.BOOL,
    np.dtype(np.complex64): dtypes.C64, np.dtype(np.complex128): dtypes.C128,
}


def dtype_of_numpy(np_dtype) -> DType:
    return _NUMPY_TO_DTYPE[np.dtype(np_dtype).newbyteorder("=")]
