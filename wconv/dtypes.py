"""Element types as data: one table, used by every reader and writer.

Names follow GGML/safetensors spelling (F32, BF16, Q8_0...). numpy has no
bfloat16 or float8, so those are kept as raw unsigned integers of the same
width and widened to float32 on request. Quantised GGML types are blocks of
bytes; `block` says how many elements one block of `block_bytes` holds.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class DType:
    name: str
    storage: np.dtype  # numpy dtype of the raw data (uint8 for quantised blocks)
    itemsize: int  # bytes per element (for quantised: 0, use block_bytes)
    is_float: bool = False
    block: int = 1  # elements per block (1 for plain types)
    block_bytes: int = 0  # bytes per block (0 for plain types)

    @property
    def quantized(self) -> bool:
        return self.block > 1

    def nbytes(self, n_elements: int) -> int:
        if self.quantized:
            return (n_elements // self.block) * self.block_bytes
        return n_elements * self.itemsize

    def __str__(self) -> str:
        return self.name


def _plain(name, np_dtype, is_float=False):
    dt = np.dtype(np_dtype)
    return DType(name, dt, dt.itemsize, is_float)


F64 = _plain("F64", np.float64, True)
F32 = _plain("F32", np.float32, True)
F16 = _plain("F16", np.float16, True)
BF16 = DType("BF16", np.dtype(np.uint16), 2, True)
F8_E4M3 = DType("F8_E4M3", np.dtype(np.uint8), 1, True)
F8_E5M2 = DType("F8_E5M2", np.dtype(np.uint8), 1, True)
F8_E4M3FNUZ = DType("F8_E4M3FNUZ", np.dtype(np.uint8), 1, True)
F8_E5M2FNUZ = DType("F8_E5M2FNUZ", np.dtype(np.uint8), 1, True)
I64 = _plain("I64", np.int64)
I32 = _plain("I32", np.int32)
I16 = _plain("I16", np.int16)
I8 = _plain("I8", np.int8)
U64 = _plain("U64", np.uint64)
U32 = _plain("U32", np.uint32)
U16 = _plain("U16", np.uint16)
U8 = _plain("U8", np.uint8)
BOOL = _plain("BOOL", np.bool_)
C64 = _plain("C64", np.complex64, True)
C128 = _plain("C128", np.complex128, True)
C32 = DType("C32", np.dtype(np.float16), 4, True)  # complex32: pairs of float16
Q8_0 = DType("Q8_0", np.dtype(np.uint8), 0, True, block=32, block_bytes=34)
Q4_0 = DType("Q4_0", np.dtype(np.uint8), 0, True, block=32, block_bytes=18)
Q4_1 = DType("Q4_1", np.dtype(np.uint8), 0, True, block=32, block_bytes=20)
Q5_0 = DType("Q5_0", np.dtype(np.uint8), 0, True, block=32, block_bytes=22)
Q5_1 = DType("Q5_1", np.dtype(np.uint8), 0, True, block=32, block_bytes=24)
Q2_K = DType("Q2_K", np.dtype(np.uint8), 0, True, block=256, block_bytes=84)
Q3_K = DType("Q3_K", np.dtype(np.uint8), 0, True, block=256, block_bytes=110)
Q4_K = DType("Q4_K", np.dtype(np.uint8), 0, True, block=256, block_bytes=144)
Q5_K = DType("Q5_K", np.dtype(np.uint8), 0, True, block=256, block_bytes=176)
Q6_K = DType("Q6_K", np.dtype(np.uint8), 0, True, block=256, block_bytes=210)

ALL = {d.name: d for d in (F64, F32, F16, BF16, F8_E4M3, F8_E5M2, F8_E4M3FNUZ, F8_E5M2FNUZ,
                            I64, I32, I16, I8, U64, U32, U16, U8, BOOL, C64, C128, C32,
                            Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K)}


def by_name(name: str) -> DType:
    return ALL[name]


def bf16_to_f32(raw: np.ndarray) -> np.ndarray:
    """Widen raw bfloat16 bits (uint16) to float32: bf16 is the top half of an f32."""
    raw = np.asarray(raw, dtype=np.uint16)
    out = np.empty(raw.shape, dtype=np.uint32)
    np.left_shift(raw, 16, out=out, dtype=np.uint32)  # one pass, no uint32 temporary
    return out.view(np.float32)


def f32_to_bf16(x: np.ndarray) -> np.ndarray:
    """Round float32 to bfloat16 bits (uint16), nearest-even; NaN stays NaN."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    bits = x.view(np.uint32)
    # In place on one uint32 temporary (peak ~1.5x the input, not 6x with uint64 steps).
    # The sum wraps only for bit patterns >= 0xFFFF8001, which are NaNs, replaced below.
    r = bits >> 16
    r &= 1
    r += 0x7FFF
    r += bits
    r >>= 16
    rounded = r.astype(np.uint16)
    del r
    nan = np.isnan(x)
    if nan.any():
        rounded = np.where(nan, ((bits >> 16) | 0x40).astype(np.uint16), rounded)
    return rounded


def _f8_table(exp_bits: int, man_bits: int, bias: int, fnuz: bool, ieee_inf: bool) -> np.ndarray:
    """float32 value of every one of the 256 float8 bit patterns."""
    out = np.empty(256, dtype=np.float32)
    for b in range(256):
        sign = -1.0 if b & 0x80 else 1.0
        e = (b >> man_bits) & ((1 << exp_bits) - 1)
        m = b & ((1 << man_bits) - 1)
        if fnuz and b == 0x80:
            out[b] = np.nan
            continue
        if ieee_inf and e == (1 << exp_bits) - 1:
            out[b] = sign * np.inf if m == 0 else np.nan
            continue
        if not fnuz and not ieee_inf and e == (1 << exp_bits) - 1 and m == (1 << man_bits) - 1:
            out[b] = np.nan  # e4m3fn: only S.1111.111 is NaN, no infinities
            continue
        if e == 0:
            val = (m / (1 << man_bits)) * 2.0 ** (1 - bias)
        else:
            val = (1 + m / (1 << man_bits)) * 2.0 ** (e - bias)
        out[b] = sign * val
    return out


_F8_TABLES = {}


def f8_to_f32(raw: np.ndarray, name: str) -> np.ndarray:
    if name not in _F8_TABLES:
        params = {"F8_E4M3": (4, 3, 7, False, False), "F8_E5M2": (5, 2, 15, False, True),
                  "F8_E4M3FNUZ": (4, 3, 8, True, False), "F8_E5M2FNUZ": (5, 2, 16, True, False)}[name]
        _F8_TABLES[name] = _f8_table(*params)
    return _F8_TABLES[name][np.asarray(raw, dtype=np.uint8)]
