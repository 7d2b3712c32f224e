"""GGML's legacy block quantisers (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1), bit-exact with ggml.

Each follows ggml's reference C (`quantize_row_*_ref` in ggml-quants.c) step by step in
float32, including what it does with zeros, NaN and infinities, and works on cache-sized
sub-pieces of blocks. gguf-py has the same algorithms, but differs from ggml on blocks
holding NaN, infinities or only -0.0, and its Q8_0 makes a dozen passes over the data
(28 M values/s here; these ~570 M for Q8_0, 250-350 M for the others, per core).
tests/test_codecs.py compares the bytes with ggml's own `ggml_quantize_chunk` and with gguf-py.

The C details reproduced:
- Q8_0: amax = MAX(amax, fabsf(v)) from +0, where MAX(a, b) is `a > b ? a : b`, so a NaN
  counts only when it is a block's last value; q = roundf(v * id), half away from zero,
  computed as trunc(t + copysign(0.49999997, t)) (the float just below one half cannot
  carry a value under .5 to the next integer; a true .5 still gets there).
- Q4_0/Q5_0: `max` is the first value whose |v| exceeds every earlier one, starting from
  amax = +0 and max = +0 (NaN never exceeds, an all-zero block keeps max = +0, so d = -0).
- Q4_1/Q5_1: min and max start at FLT_MAX and -FLT_MAX and take only values that compare
  below/above (so NaN is skipped, +inf never becomes the minimum, and of +0.0 and -0.0
  the first one seen is kept).
- (int8_t)(float) is x86's truncating conversion to int32 (INT_MIN for NaN or overflow)
  keeping the low byte; then MIN(15 or 31, ...).
"""
from __future__ import annotations

import numpy as np

from .dtypes import ALL as _DTYPES

BLOCK = 32
_SUB = 1 << 12  # blocks per sub-piece: 128K values, 512 KB of float32, stays in L2 cache
_BELOW_HALF = np.float32(np.nextafter(np.float32(0.5), np.float32(0)))
_FLT_MAX = np.float32(np.finfo(np.float32).max)


def quantize(rows: np.ndarray, kind: str) -> np.ndarray:
    """float32 values (a multiple of 32 of them, any shape) as `kind` blocks: flat uint8."""
    x = np.ascontiguousarray(rows, dtype=np.float32).reshape(-1, BLOCK)
    nb = x.shape[0]
    out = np.empty((nb, _DTYPES[kind].block_bytes), dtype=np.uint8)
    block_fn = _KINDS[kind]
    step = min(_SUB, max(nb, 1))
    scratch = (np.empty((step, BLOCK), np.float32), np.empty((step, BLOCK), np.float32))
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        for s in range(0, nb, step):
            n = min(step, nb - s)
            block_fn(x[s:s + n], out[s:s + n], scratch[0][:n], scratch[1][:n])
    return out.reshape(-1)


def _f16_bytes(v: np.ndarray) -> np.ndarray:
    """GGML_FP32_TO_FP16: round to nearest even, but any NaN becomes the quiet NaN 0x7E00 with
    its sign (numpy's cast keeps the payload's top bits)."""
    bits = v.astype(np.float16).view(np.uint16)
    nan = np.isnan(v)
    if nan.any():
        bits[nan] = (bits[nan] & np.uint16(0x8000)) | np.uint16(0x7E00)
    return bits.view(np.uint8).reshape(-1, 2)


def _inverse(d: np.ndarray) -> np.ndarray:
    """ggml's `id = d ? 1.0f/d : 0.0f` (NaN is truthy)."""
    inv = np.zeros_like(d)
    np.divide(np.float32(1), d, out=inv, where=d != 0)
    return inv


def _c_int8(v: np.ndarray) -> np.ndarray:
    """(int8_t) of float32 values on x86: truncate to int32 (INT_MIN if NaN/out of range), low byte."""
    return v.astype(np.int32).astype(np.int8)


def _columns(xb: np.ndarray, scratch: np.ndarray) -> np.ndarray:
    """xb's blocks as the columns of `scratch` (any contiguous float32 buffer of xb's size).

    numpy reduces a row of 32 values at a time, slowly (half of Q8_0's time); with the blocks
    as columns it reduces across all blocks at once, 2.5x faster for the copy included."""
    columns = scratch.reshape(BLOCK, -1)
    np.copyto(columns, xb.T)
    return columns


def _amax(xb: np.ndarray, scratch: np.ndarray) -> np.ndarray:
    """max |v| of each block (NaN if any is NaN)."""
    columns = _columns(xb, scratch)
    np.abs(columns, out=columns)
    return columns.max(axis=0)


_HALF_BELOW_BITS = np.uint32(_BELOW_HALF.view(np.uint32))
_SIGN_BIT = np.uint32(0x80000000)


def _signed_below_half(v: np.ndarray, out: np.ndarray) -> None:
    """copysign(0.49999997, v) into `out`, as bit operations (3x faster than np.copysign)."""
    bits = out.view(np.uint32)
    np.bitwise_and(v.view(np.uint32), _SIGN_BIT, out=bits)
    np.bitwise_or(bits, _HALF_BELOW_BITS, out=bits)


def _q8_0(xb, out, v, h):
    amax = _amax(xb, h)
    nan = np.isnan(amax)
    if nan.any():  # ggml's running MAX: NaN survives only as the block's last value
        bad = np.flatnonzero(nan)
        a = np.zeros(bad.size, dtype=np.float32)
        for j in range(BLOCK):
            col = np.abs(xb[bad, j])
            a = np.where(a > col, a, col)
        amax[bad] = a
    d = amax / np.float32(127)
    np.multiply(xb, _inverse(d)[:, None], out=v)
    _signed_below_half(v, h)
    v += h
    out[:, 2:] = v.astype(np.int8).view(np.uint8)  # roundf's result as int8 (truncating cast)
    out[:, :2] = _f16_bytes(d)


def _signed_max(xb, h):
    """Q4_0/Q5_0's `max`: the first value of largest |v|; +0 if there is none above 0; NaN skipped.
    (An argmax per block, unlike the reductions on columns elsewhere here: on columns, finding
    the first position of the maximum costs as much as this saves.)"""
    np.abs(xb, out=h)
    h[np.isnan(h)] = 0
    idx = h.argmax(axis=1)
    rows = np.arange(xb.shape[0])
    mx = xb[rows, idx]
    return np.where(h[rows, idx] > 0, mx, np.float32(0))


def _min_max(xb, h):
    """Q4_1/Q5_1's min and max: from FLT_MAX / -FLT_MAX, NaN skipped. C's strict `<` / `>`
    keeps the first of equal values, which only shows for zeros: a block's min or max of
    zero takes the sign of its first zero (fmin/fmax may return either)."""
    columns = _columns(xb, h)
    nan = np.isnan(columns)
    if nan.any():  # skipped by C's comparisons (fmin/fmax skip quiet NaNs only)
        lo = np.where(nan, _FLT_MAX, columns).min(axis=0)
        hi = np.where(nan, -_FLT_MAX, columns).max(axis=0)
    else:
        lo, hi = columns.min(axis=0), columns.max(axis=0)
    lo, hi = np.minimum(lo, _FLT_MAX), np.maximum(hi, -_FLT_MAX)
    zero = np.flatnonzero((lo == 0) | (hi == 0))
    if zero.size:
        blocks = xb[zero]
        first = blocks[np.arange(zero.size), (blocks == 0).argmax(axis=1)]
        lo[zero] = np.where(lo[zero] == 0, first, lo[zero])
        hi[zero] = np.where(hi[zero] == 0, first, hi[zero])
    return lo, hi


def _nibbles(q: np.ndarray) -> np.ndarray:
    """Q5_*: qs[j] = low nibble of q[j] | low nibble of q[j + 16] << 4."""
    return (q[:, :16] & 0x0F) | ((q[:, 16:] & 0x0F) << 4)


def _nibbles_unmasked(q: np.ndarray) -> np.ndarray:
    """Q4_*: qs[j] = q[j] | q[j + 16] << 4 (ggml does not mask: only matters for NaN blocks)."""
    return q[:, :16] | (q[:, 16:] << 4)


def _high_bits(q: np.ndarray) -> np.ndarray:
    """qh: bit j is bit 4 of q[j] (little-endian uint32 as 4 bytes)."""
    return np.packbits((q >> 4) & 1, axis=1, bitorder="little")


def _levels(v, offset, top, h):
    """MIN(top, (int8_t)(v + offset)) as uint8, v in place."""
    v += np.float32(offset)
    q = _c_int8(v)
    return np.minimum(q, np.int8(top)).view(np.uint8)


def _q4_0(xb, out, v, h):
    d = _signed_max(xb, h) / np.float32(-8)
    np.multiply(xb, _inverse(d)[:, None], out=v)
    q = _levels(v, 8.5, 15, h)
    out[:, :2] = _f16_bytes(d)
    out[:, 2:] = _nibbles_unmasked(q)


def _q5_0(xb, out, v, h):
    d = _signed_max(xb, h) / np.float32(-16)
    np.multiply(xb, _inverse(d)[:, None], out=v)
    q = _levels(v, 16.5, 31, h)
    out[:, :2] = _f16_bytes(d)
    out[:, 2:6] = _high_bits(q)
    out[:, 6:] = _nibbles(q)


def _q4_1(xb, out, v, h):
    lo, hi = _min_max(xb, h)
    d = (hi - lo) / np.float32(15)
    np.subtract(xb, lo[:, None], out=v)
    v *= _inverse(d)[:, None]
    q = _levels(v, 0.5, 15, h)
    out[:, :2] = _f16_bytes(d)
    out[:, 2:4] = _f16_bytes(lo)
    out[:, 4:] = _nibbles_unmasked(q)


def _q5_1(xb, out, v, h):
    lo, hi = _min_max(xb, h)
    d = (hi - lo) / np.float32(31)
    np.subtract(xb, lo[:, None], out=v)
    v *= _inverse(d)[:, None]
    q = _levels(v, 0.5, 31, h)
    out[:, :2] = _f16_bytes(d)
    out[:, 2:4] = _f16_bytes(lo)
    out[:, 4:8] = _high_bits(q)
    out[:, 8:] = _nibbles(q)


_KINDS = {"Q8_0": _q8_0, "Q4_0": _q4_0, "Q4_1": _q4_1, "Q5_0": _q5_0, "Q5_1": _q5_1}
