"""Element types of the GGML family (GGUF, GGJT): mapping, per-tensor choice, encoding.

Both GGML-family writers use this module to decide what type each tensor is
written as and to produce its bytes. Quantisation itself is gguf-py's
(`gguf.quants.quantize`), which is bit-exact with ggml's reference
`quantize_row_q8_0_ref` / `quantize_row_q4_0_ref`; nothing here re-implements it.

Rules (documented in docs/gguf.md):
- 1-D tensors (norms, biases) are always F32: llama.cpp's graphs expect F32 norms.
- `dtype=None` keeps each matrix's own type when the format can hold it (copying
  quantised blocks unchanged, never re-quantising); F64 becomes F32 and float8
  becomes F16 (exact: every float8 value is an F16 value).
- `q8_0`/`q4_0` quantise a matrix only if its rows are a whole number of 32-element
  blocks; other matrices fall back to F16 and the fallback is reported.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from . import dtypes
from .dtypes import DType
from .notes import tensor_note

OPTION_TYPES = dtypes.BY_OPTION

# llama.cpp's llama_ftype for a file whose matrices are mostly of this type.
_FILE_TYPES = {"F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "Q5_0": 8, "Q5_1": 9,
               "Q2_K": 10, "Q3_K": 12, "Q4_K": 15, "Q5_K": 17, "Q6_K": 18, "IQ4_NL": 25,
               "IQ4_XS": 30, "BF16": 32}
FILE_TYPE_GUESSED = 1024


def ggml_dtype(ggml_type: int) -> DType:
    """Our DType for a GGMLQuantizationType value (unknown values raise KeyError/ValueError)."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    qt = GGMLQuantizationType(int(ggml_type))
    if qt.name in dtypes.ALL:
        return dtypes.ALL[qt.name]
    block, block_bytes = GGML_QUANT_SIZES[qt]
    # Less common quantised types: described here, dequantised by gguf-py on request.
    return DType(qt.name, np.dtype(np.uint8), 0, True, block=block, block_bytes=block_bytes)


def ggml_type(dt: DType):
    """The GGMLQuantizationType for our DType (KeyError if GGML has none)."""
    from gguf import GGMLQuantizationType

    return GGMLQuantizationType[dt.name]


def has_ggml_type(dt: DType) -> bool:
    from gguf import GGMLQuantizationType

    return dt.name in GGMLQuantizationType.__members__


def row_fits(shape: tuple, dt: DType) -> bool:
    """True if each row (last axis) of `shape` is a whole number of `dt` blocks."""
    return not dt.quantized or (len(shape) >= 1 and shape[-1] % dt.block == 0)


@dataclass
class TypePlan:
    types: dict  # tensor name -> DType written
    notes: list = field(default_factory=list)  # human-readable fallbacks
    option: str | None = None
    matrix_sizes: dict = field(default_factory=dict)  # matrix name -> (DType written, n_elements)

    def file_type(self) -> int:
        """llama_ftype of the file: the requested type, else the type most matrix elements have."""
        if self.option is not None:
            return _FILE_TYPES[OPTION_TYPES[self.option].name]
        return _FILE_TYPES.get(self.dominant(), FILE_TYPE_GUESSED)

    def dominant(self) -> str:
        counts = {}
        for dt, n in self.matrix_sizes.values():
            counts[dt.name] = counts.get(dt.name, 0) + n
        return max(counts, key=counts.get) if counts else "F32"


def plan_types(tensors, option: str | None, *, can_hold) -> TypePlan:
    """Decide the written type of each tensor.

    tensors: iterable of LazyTensor; option: None or a key of OPTION_TYPES;
    can_hold(dtype) -> bool says which types the output format stores.
    Raises ValueError (with a message naming the tensor) for tensors that have no
    float meaning (integers, booleans, complex).
    """
    if option is not None and option not in OPTION_TYPES:
        raise ValueError(f"unknown dtype {option!r}; choose one of {', '.join(OPTION_TYPES)}")
    plan = TypePlan({}, option=option)
    for t in tensors:
        src = t.dtype
        if not src.is_float or src.name.startswith("C"):
            raise ValueError(f"tensor {t.name} has element type {src.name}, which is not a weight type")
        if len(t.shape) <= 1:
            plan.types[t.name] = dtypes.F32
            continue
        if option is None:
            if src is dtypes.F64:
                target = dtypes.F32
            elif src.name.startswith("F8_"):
                target = dtypes.F16
            elif can_hold(src) and row_fits(t.shape, src):
                target = src
            else:
                target = dtypes.F32
                plan.notes.append(tensor_note(f"{src.name} tensors written as F32 (the format cannot store "
                                              f"{src.name})", t.name, f"{src.name} cannot be stored; written as F32"))
        else:
            target = OPTION_TYPES[option]
            if not row_fits(t.shape, target):
                plan.notes.append(tensor_note(
                    f"tensors written as F16 instead of {target.name}: rows not a multiple of {target.block}",
                    t.name, f"row length {t.shape[-1]} is not a multiple of {target.block}; written as F16 "
                            f"instead of {target.name}"))
                target = dtypes.F16
            elif target.quantized and src.quantized and src != target:
                plan.notes.append(tensor_note(f"{src.name} tensors re-quantised to {target.name}", t.name,
                                              f"re-quantised from {src.name} to {target.name}"))
        plan.types[t.name] = target
        plan.matrix_sizes[t.name] = (target, t.n_elements)
    return plan


def encode(t, target: DType) -> np.ndarray:
    """The bytes of tensor `t` stored as `target`, as a C-contiguous numpy array.

    Same type in and out: the stored data is passed through unchanged (quantised
    blocks are copied, never re-quantised). Otherwise the values are widened to
    float32 and converted with gguf-py (F16: numpy's round-to-nearest-even, as
    ggml; BF16 and Q8_0/Q4_0: gguf.quants, bit-exact with ggml's reference code).
    """
    from gguf.quants import quantize

    if t.dtype == target:
        arr = np.ascontiguousarray(t.raw())
        if target.quantized:
            arr = arr.reshape(-1).view(np.uint8)
        else:
            arr = arr.astype(target.storage.newbyteorder("<"), copy=False)
    else:
        values = np.ascontiguousarray(t.float32(), dtype=np.float32)
        if target is dtypes.F32:
            arr = values
        elif target is dtypes.F16:
            with np.errstate(over="ignore"):
                arr = values.astype(np.float16)
        else:
            arr = quantize(values, ggml_type(target))
    expected = target.nbytes(t.n_elements)
    if arr.nbytes != expected:
        raise ValueError(f"tensor {t.name}: {arr.nbytes} bytes of {target.name} data, expected {expected}")
    return arr


def overflow_note(name: str, target: DType = dtypes.F16):
    """The note for a tensor whose values beyond the F16 range became infinities."""
    return tensor_note(f"tensors with values beyond the {target.name} range written as infinities", name,
                       f"values beyond the {target.name} range became infinities")


def overflowed(t, target: DType, arr: np.ndarray) -> bool:
    """True if converting to F16 turned finite values into infinities."""
    return target is dtypes.F16 and t.dtype is not dtypes.F16 and bool(np.isinf(arr).any())
