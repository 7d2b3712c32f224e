"""Element-type codecs: the one table of how each element type is stored, read and written.

For each element type (wconv.dtypes names it and says its block layout) a Codec records
its GGML type id, the llama_ftype a file made mostly of it declares, which source types
it carries without loss, how to read a raw piece of it as float32 (`decode`) and, where
wconv can produce it, how to write float32 rows as it (`encode`). Writers, the type
planner (wconv.quant), parity's rounding simulation and the CLI's --dtype choices all
derive from this table.

Encoders work on whole-row pieces (a 2-D float32 array, rows of the tensor) so a writer
can convert a tensor a few megabytes at a time on several threads; quantised types need
each row to be a whole number of blocks. GGML's legacy quantisers (Q8_0, Q4_0, Q4_1,
Q5_0, Q5_1) are wconv.blockquant's, which tests/test_codecs.py checks byte for byte against
ggml's own `ggml_quantize_chunk` and gguf-py's (gguf-py differs from ggml on NaN, infinity
and all -0.0 blocks, and is slower). Other modules add encoders with `register_encoder`
(wconv.kquants adds Q2_K..Q6_K this way); `load_plugins` imports those modules.
"""
from __future__ import annotations

import importlib
import threading
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from . import dtypes
from .dtypes import DType

# Modules that register encoders here when imported (ENCODERS = {type name: fn}).
PLUGINS = ("wconv.kquants",)


@dataclass
class Codec:
    dtype: DType
    ggml_id: int | None = None  # GGMLQuantizationType value; None: GGML has no such type
    file_type: int | None = None  # llama_ftype of a file whose matrices are mostly this type
    lossless_from: frozenset = frozenset()  # other source types whose every value this type holds
    encoder: Callable | None = field(default=None, repr=False)  # float32 rows -> stored bytes

    @property
    def name(self) -> str:
        return self.dtype.name

    @property
    def option(self) -> str | None:
        """The --dtype spelling, if wconv can write this type."""
        return self.name.lower() if self.encoder is not None else None

    def carries(self, src: DType) -> bool:
        """True if every value of `src` is stored exactly (no rounding) as this type."""
        return src == self.dtype or src.name in self.lossless_from

    def fits(self, shape: tuple) -> bool:
        """True if rows (last axis) of `shape` are whole blocks of this type."""
        return not self.dtype.quantized or (len(shape) >= 1 and shape[-1] % self.dtype.block == 0)

    def encode(self, rows: np.ndarray) -> np.ndarray:
        """float32 rows (2-D, C order) as this type's bytes: a flat little-endian array."""
        if self.encoder is None:
            load_plugins()
        if self.encoder is None:
            raise ValueError(f"wconv cannot write element type {self.name}")
        rows = np.asarray(rows, dtype=np.float32)
        if rows.ndim != 2:
            rows = rows.reshape(-1, rows.shape[-1] if rows.ndim else 1)
        if not self.fits(rows.shape):
            raise ValueError(f"rows of {rows.shape[1]} elements are not whole {self.name} blocks "
                             f"of {self.dtype.block}")
        out = self.encoder(np.ascontiguousarray(rows))
        expected = self.dtype.nbytes(rows.size)
        out = np.ascontiguousarray(out).reshape(-1)
        if out.nbytes != expected:
            raise ValueError(f"{self.name} encoder produced {out.nbytes} bytes for {rows.size} values, "
                             f"expected {expected}")
        return out

    def decode(self, raw: np.ndarray) -> np.ndarray:
        """A raw piece (storage dtype; whole blocks of uint8 for quantised types) as flat float32."""
        return _decode(self.dtype, raw)


def _decode(dt: DType, raw: np.ndarray) -> np.ndarray:
    if dt.quantized:
        from gguf import GGMLQuantizationType
        from gguf.quants import dequantize

        flat = np.ascontiguousarray(raw, dtype=np.uint8).reshape(-1)
        if flat.size == 0:
            return np.empty(0, np.float32)
        out = dequantize(flat, GGMLQuantizationType[dt.name])
        return out.astype(np.float32, copy=False).reshape(-1)
    if dt is dtypes.BF16:
        return dtypes.bf16_to_f32(raw).reshape(-1)
    if dt.name.startswith("F8_"):
        return dtypes.f8_to_f32(raw, dt.name).reshape(-1)
    if dt.name in ("C32", "C64", "C128"):
        raise TypeError("complex tensors have no float32 form")
    return np.asarray(raw).astype(np.float32, copy=False).reshape(-1)


# --- encoders --------------------------------------------------------------------------------

def _to_f32(rows):
    return rows.astype("<f4", copy=False)


def _to_f16(rows):
    with np.errstate(over="ignore"):  # beyond the F16 range: infinity, as ggml does
        return rows.astype("<f2")


def _to_bf16(rows):
    return dtypes.f32_to_bf16(rows)  # nearest-even, NaN kept quiet: ggml_compute_fp32_to_bf16


def _block_quantizer(name: str) -> Callable:
    def encode(rows):
        from .blockquant import quantize  # ggml's reference algorithms, bit-exact

        return quantize(rows, name)
    encode.__name__ = f"encode_{name.lower()}"
    return encode


_F8 = frozenset({"F8_E4M3", "F8_E5M2", "F8_E4M3FNUZ", "F8_E5M2FNUZ"})

# GGML type ids and llama_ftype values are fixed by ggml.h / llama.h (checked against gguf-py
# in the tests). llama_ftype has one value per K-quant mix; the _M mix is the usual one.
_TABLE = [
    Codec(dtypes.F32, 0, 0, frozenset({"F16", "BF16"}) | _F8, _to_f32),
    Codec(dtypes.F16, 1, 1, _F8, _to_f16),
    Codec(dtypes.BF16, 30, 32, _F8, _to_bf16),
    Codec(dtypes.Q8_0, 8, 7, encoder=_block_quantizer("Q8_0")),
    Codec(dtypes.Q4_0, 2, 2, encoder=_block_quantizer("Q4_0")),
    Codec(dtypes.Q4_1, 3, 3, encoder=_block_quantizer("Q4_1")),
    Codec(dtypes.Q5_0, 6, 8, encoder=_block_quantizer("Q5_0")),
    Codec(dtypes.Q5_1, 7, 9, encoder=_block_quantizer("Q5_1")),
    Codec(dtypes.Q2_K, 10, 10),
    Codec(dtypes.Q3_K, 11, 12),
    Codec(dtypes.Q4_K, 12, 15),
    Codec(dtypes.Q5_K, 13, 17),
    Codec(dtypes.Q6_K, 14, 18),
    Codec(dtypes.F64, 28, None, frozenset({"F32", "F16", "BF16"}) | _F8),
    Codec(dtypes.I8, 24), Codec(dtypes.I16, 25), Codec(dtypes.I32, 26), Codec(dtypes.I64, 27),
]
CODECS: dict[str, Codec] = {c.name: c for c in _TABLE}
for _dt in dtypes.ALL.values():  # the rest (float8, unsigned, bool, complex): decode only, no GGML id
    CODECS.setdefault(_dt.name, Codec(_dt))
_BY_GGML_ID = {c.ggml_id: c for c in CODECS.values() if c.ggml_id is not None}
FILE_TYPE_GUESSED = 1024  # llama_ftype flag: "guessed", for files of mixed types


def get(dt) -> Codec:
    """The codec of a DType or type name."""
    return CODECS[dt if isinstance(dt, str) else dt.name]


def for_ggml_id(ggml_id: int) -> Codec:
    """The codec of a GGML type id; rarer GGML types (IQ*, TQ*, MXFP4...) are described from
    gguf-py's block sizes and can be decoded but not written. Unknown ids raise ValueError."""
    codec = _BY_GGML_ID.get(int(ggml_id))
    if codec is not None:
        return codec
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    qt = GGMLQuantizationType(int(ggml_id))
    block, block_bytes = GGML_QUANT_SIZES[qt]
    dt = dtypes.ALL.get(qt.name) or DType(qt.name, np.dtype(np.uint8), 0, True, block=block,
                                          block_bytes=block_bytes)
    codec = Codec(dt, int(ggml_id))
    CODECS.setdefault(dt.name, codec)
    _BY_GGML_ID[codec.ggml_id] = codec
    return codec


def register_encoder(name: str, fn: Callable) -> None:
    """Let wconv write type `name` with fn(float32 rows) -> bytes (uint8 array)."""
    codec = CODECS[name]
    if codec.encoder is not None and codec.encoder is not fn:
        raise ValueError(f"an encoder for {name} is already registered")
    codec.encoder = fn


_plugins_loaded = False
_plugins_lock = threading.Lock()


def load_plugins() -> None:
    """Import the modules in PLUGINS that exist and register their ENCODERS (once) for the
    types that have none yet. Thread-safe: encoder threads of a writer may be the first to
    ask, and none may see the table half filled."""
    global _plugins_loaded
    if _plugins_loaded:
        return
    with _plugins_lock:
        if _plugins_loaded:
            return
        for module_name in PLUGINS:
            try:
                module = importlib.import_module(module_name)
            except ModuleNotFoundError as e:
                if e.name != module_name:
                    raise
                continue
            for name, fn in getattr(module, "ENCODERS", {}).items():
                # The table's own encoders (checked against ggml) stay; plugins fill the gaps.
                if name in CODECS and CODECS[name].encoder is None:
                    register_encoder(name, fn)
        _plugins_loaded = True


def writable(*, ggml: bool = False) -> list[Codec]:
    """Codecs wconv can encode (ggml=True: only those with a GGML type), in table order."""
    load_plugins()
    return [c for c in CODECS.values() if c.encoder is not None and (c.ggml_id is not None or not ggml)]


def options(*, ggml: bool = False) -> tuple:
    """--dtype spellings wconv can write, e.g. ('f32', 'f16', 'bf16', 'q8_0', ...)."""
    return tuple(c.option for c in writable(ggml=ggml))


def by_option(value) -> DType | None:
    """The DType a --dtype value names (a DType passes through), or None."""
    if isinstance(value, DType):
        return value
    load_plugins()
    codec = CODECS.get(str(value).upper())
    return codec.dtype if codec is not None and codec.encoder is not None else None


# --- conversion between stored forms ----------------------------------------------------------

_LUT_PIECE = 1 << 16  # values per table look-up: index and output stay in L2 cache
_luts: dict = {}


def converter(src: DType, dst: DType) -> Callable:
    """fn(raw piece of `src`, rows shape) -> the piece stored as `dst` (flat array).

    Between plain types whose source has at most 65536 bit patterns (F16, BF16, float8) and a
    16-bit-or-narrower target, a table of every source pattern's encoded value replaces the
    float32 round trip (4x faster, the same bytes: it is that round trip, done once per pattern).
    """
    src_c, dst_c = get(src), get(dst)
    if not src.quantized and not dst.quantized and src.itemsize <= 2 and dst.itemsize <= 2 \
            and src.name not in ("I8", "I16", "U8", "U16", "BOOL", "C32"):
        table = _luts.get((src.name, dst.name))
        if table is None:
            patterns = np.arange(1 << (8 * src.itemsize), dtype=f"<u{src.itemsize}")
            values = src_c.decode(patterns.view(src.storage.newbyteorder("<")))
            table = _luts[(src.name, dst.name)] = dst_c.encode(values.reshape(1, -1))
        if (src.name, dst.name) == ("BF16", "F16"):
            return lambda raw, shape: _bf16_to_f16(table, raw)
        return lambda raw, shape: _look_up(table, raw, src.itemsize)
    return lambda raw, shape: dst_c.encode(src_c.decode(raw).reshape(shape))


def _look_up(table: np.ndarray, raw: np.ndarray, width: int) -> np.ndarray:
    index = np.ascontiguousarray(raw).reshape(-1).view(f"<u{width}")
    out = np.empty(index.size, dtype=table.dtype)
    for s in range(0, index.size, _LUT_PIECE):
        np.take(table, index[s:s + _LUT_PIECE], out=out[s:s + _LUT_PIECE])
    return out


# BF16 -> F16, the commonest conversion: a BF16 value of magnitude in [2^-14, 2^16) (exponent
# field 113..142) is an F16 normal with the same 7 mantissa bits and no rounding, so its F16
# bits are sign | (magnitude bits - 112 << 7) << 3. Those are ~99.8% of a model's weights;
# the rest (subnormals, zeros, overflow, NaN) come from the table. 1.6x faster than the table
# alone, whose np.take first widens every uint16 index to 64 bits.
_BF16_F16_PIECE = 1 << 18  # values per step: the step's temporaries stay in L2 cache
_F16_NORMAL_LOW, _F16_NORMAL_SPAN = np.uint16(113 << 7), np.uint16(30 << 7)


def _bf16_to_f16(table: np.ndarray, raw: np.ndarray) -> np.ndarray:
    bits = np.ascontiguousarray(raw).reshape(-1).view("<u2")
    table_bits = table.view("<u2")
    out = np.empty(bits.size, dtype="<u2")
    n = min(bits.size, _BF16_F16_PIECE)
    work, other = np.empty(n, np.uint16), np.empty(n, bool)
    for s in range(0, bits.size, _BF16_F16_PIECE):
        b, o = bits[s:s + _BF16_F16_PIECE], out[s:s + _BF16_F16_PIECE]
        m, k = work[:b.size], other[:b.size]
        np.bitwise_and(b, np.uint16(0x7FFF), out=m)
        np.subtract(m, _F16_NORMAL_LOW, out=o)  # wraps around below the range
        np.greater_equal(o, _F16_NORMAL_SPAN, out=k)
        np.add(o, np.uint16(1 << 7), out=o)
        np.left_shift(o, np.uint16(3), out=o)
        np.bitwise_and(b, np.uint16(0x8000), out=m)
        np.bitwise_or(o, m, out=o)
        if k.any():
            i = np.flatnonzero(k)
            o[i] = table_bits[b[i]]
    return out.view(table.dtype)


def round_trip(x: np.ndarray, dt: DType) -> np.ndarray:
    """float32 `x` as it reads back after being stored as `dt` (x's shape; rows = last axis)."""
    codec = get(dt)
    x = np.ascontiguousarray(x, dtype=np.float32)
    rows = x.reshape(-1, x.shape[-1]) if x.ndim >= 1 else x.reshape(1, 1)
    return codec.decode(codec.encode(rows)).reshape(x.shape)


def from_option(value, allowed: tuple, where, what: str) -> DType:
    """The DType named by a --dtype value (or given as a DType), if `what` can store it.

    The spellings are the table's (the type name in lower case, for types wconv can write)."""
    from .errors import UsageError

    dt = by_option(value)
    if dt is None or dt.name.lower() not in allowed:
        choices = ", ".join(allowed[:-1]) + " or " + allowed[-1] if len(allowed) > 1 else allowed[0]
        raise UsageError(where, f"{what} supports --dtype {choices}, not {value}")
    return dt
