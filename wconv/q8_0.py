"""GGML's Q8_0 blocks, computed fast and bit-exact with ggml's `quantize_row_q8_0_ref`.

gguf-py's Q8_0 quantiser is exact but makes a dozen full passes over the data (28 M
values/s here); this one makes five, over cache-sized sub-pieces (about 200 M values/s),
and that is the difference between Q8_0 output being CPU-bound or I/O-bound. The
arithmetic is ggml's, step by step, in float32:

    amax = max |x| over the block;  d = amax / 127;  id = d ? 1/d : 0
    q = roundf(x * id)              (half away from zero), stored as int8; d as float16

roundf is trunc(v + copysign(0.49999997, v)): adding the float just below one half cannot
carry a value below .5 up to the next integer, while a true .5 still reaches it. ggml's
running maximum skips a NaN unless it is the block's last value (`MAX(a, b)` is `a > b ?
a : b`); blocks holding NaN are redone that way. tests/test_codecs.py compares bytes with
gguf-py and with ggml itself.
"""
from __future__ import annotations

import numpy as np

BLOCK = 32
BLOCK_BYTES = 34
_SUB = 1 << 12  # blocks per sub-piece: 128K values, 512 KB of float32, stays in L2 cache
_BELOW_HALF = np.float32(np.nextafter(np.float32(0.5), np.float32(0)))


def quantize(rows: np.ndarray) -> np.ndarray:
    """float32 values (any shape, a multiple of 32 of them) as Q8_0 blocks: flat uint8."""
    x = np.ascontiguousarray(rows, dtype=np.float32).reshape(-1, BLOCK)
    nb = x.shape[0]
    out = np.empty((nb, BLOCK_BYTES), dtype=np.uint8)
    step = min(_SUB, max(nb, 1))
    v = np.empty((step, BLOCK), dtype=np.float32)
    h = np.empty((step, BLOCK), dtype=np.float32)
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        for s in range(0, nb, step):
            xb = x[s:s + step]
            n = xb.shape[0]
            vb, hb = v[:n], h[:n]
            amax = _amax(xb, hb)
            if np.isnan(amax).any():
                amax = _ggml_amax(xb, amax)
            d = amax / np.float32(127)
            inv = np.zeros_like(d)
            np.divide(np.float32(1), d, out=inv, where=d != 0)
            np.multiply(xb, inv[:, None], out=vb)
            np.copysign(_BELOW_HALF, vb, out=hb)
            vb += hb
            out[s:s + n, 2:] = vb.astype(np.int8).view(np.uint8)  # the cast truncates toward zero
            out[s:s + n, :2] = d.astype(np.float16).view(np.uint8).reshape(n, 2)
    return out.reshape(-1)


def _amax(xb: np.ndarray, scratch: np.ndarray) -> np.ndarray:
    """max |x| of each block (NaN if any is NaN), by halving: numpy reduces short rows slowly."""
    np.abs(xb, out=scratch)
    w = BLOCK
    while w > 1:
        w //= 2
        np.maximum(scratch[:, :w], scratch[:, w:2 * w], out=scratch[:, :w])
    return scratch[:, 0].copy()


def _ggml_amax(xb: np.ndarray, amax: np.ndarray) -> np.ndarray:
    """ggml's amax = MAX(amax, fabsf(v)) for the blocks whose numpy maximum is NaN."""
    bad = np.flatnonzero(np.isnan(amax))
    a = np.zeros(bad.size, dtype=np.float32)
    for j in range(BLOCK):
        col = np.abs(xb[bad, j])
        a = np.where(a > col, a, col)
    amax = amax.copy()
    amax[bad] = a
    return amax
