"""Element types of the GGML family (GGUF, GGJT): which type each tensor is written as.

Both GGML-family writers use this module to decide what type each tensor is written as;
the types themselves (GGML ids, llama_ftype values, encoders) are wconv.codecs' table and
the bytes are produced by wconv.stream.

Rules (documented in docs/gguf.md):
- 1-D tensors (norms, biases) are always F32: llama.cpp's graphs expect F32 norms.
- `dtype=None` keeps each matrix's own type when the format can hold it (copying
  quantised blocks unchanged, never re-quantising); F64 becomes F32 and float8
  becomes F16 (exact: every float8 value is an F16 value).
- a quantised `dtype` (q8_0, q4_0, q4_1, q5_0, q5_1, ...) quantises a matrix only if its
  rows are a whole number of blocks; other matrices fall back to F16 and the fallback is
  reported.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from . import codecs, dtypes
from .dtypes import DType
from .notes import tensor_note

FILE_TYPE_GUESSED = codecs.FILE_TYPE_GUESSED


def ggml_dtype(ggml_type: int) -> DType:
    """Our DType for a GGMLQuantizationType value (unknown values raise KeyError/ValueError)."""
    return codecs.for_ggml_id(ggml_type).dtype


def ggml_type(dt: DType) -> int:
    """The GGML type id of our DType (KeyError if GGML has none)."""
    ggml_id = codecs.get(dt).ggml_id
    if ggml_id is None:
        raise KeyError(dt.name)
    return ggml_id


def has_ggml_type(dt: DType) -> bool:
    return dt.name in codecs.CODECS and codecs.get(dt).ggml_id is not None


def option_type(option: str) -> DType:
    """The DType of a --dtype value for GGML outputs (ValueError if there is none)."""
    dt = codecs.by_option(option)
    if dt is None or not has_ggml_type(dt):
        raise ValueError(f"unknown dtype {option!r}; choose one of {', '.join(codecs.options(ggml=True))}")
    return dt


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
            return codecs.get(option_type(self.option)).file_type
        dominant = codecs.CODECS.get(self.dominant())
        return dominant.file_type if dominant is not None and dominant.file_type is not None else FILE_TYPE_GUESSED

    def dominant(self) -> str:
        counts = {}
        for dt, n in self.matrix_sizes.values():
            counts[dt.name] = counts.get(dt.name, 0) + n
        return max(counts, key=counts.get) if counts else "F32"


def plan_types(tensors, option: str | None, *, can_hold) -> TypePlan:
    """Decide the written type of each tensor.

    tensors: iterable of LazyTensor; option: None or a --dtype spelling (codecs.options);
    can_hold(dtype) -> bool says which types the output format stores.
    Raises ValueError (with a message naming the tensor) for tensors that have no
    float meaning (integers, booleans, complex).
    """
    requested = option_type(option) if option is not None else None
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
            target = requested
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


def overflow_note(name: str, target: DType = dtypes.F16):
    """The note for a tensor whose values beyond the F16 range became infinities."""
    return tensor_note(f"tensors with values beyond the {target.name} range written as infinities", name,
                       f"values beyond the {target.name} range became infinities")
