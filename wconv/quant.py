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
  reported. (GGJT; GGUF output takes `plan_mix` instead.)
- `plan_mix` (GGUF, every quantised ftype incl. q4_0/q8_0 and the k-quant mixes): the
  per-tensor types llama-quantize gives (wconv.quant_mix); tensors it never quantises keep
  their own type as `dtype=None` does; its fallbacks become notes; an already quantised
  source that must change type is dequantised first, said in one line.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from . import codecs, dtypes, quant_mix
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
    ftype: int | None = None  # llama_ftype decided by the plan (a quant_mix file type)

    def file_type(self) -> int:
        """llama_ftype of the file: the requested type, else the type most matrix elements have."""
        if self.ftype is not None:
            return self.ftype
        if self.option is not None:
            return codecs.get(option_type(self.option)).file_type
        dominant = codecs.CODECS.get(self.dominant())
        return dominant.file_type if dominant is not None and dominant.file_type is not None else FILE_TYPE_GUESSED

    def dominant(self) -> str:
        counts = {}
        for dt, n in self.matrix_sizes.values():
            counts[dt.name] = counts.get(dt.name, 0) + n
        return max(counts, key=counts.get) if counts else "F32"


def is_mix(option) -> bool:
    """True for a --dtype that GGUF output plans with llama-quantize's rules (wconv.quant_mix)."""
    return isinstance(option, str) and option.lower() in quant_mix.QUANTISED_FTYPES


def _check_weight_type(t) -> None:
    src = t.dtype
    if not src.is_float or src.name.startswith("C"):
        raise ValueError(f"tensor {t.name} has element type {src.name}, which is not a weight type")


def _kept_type(t, can_hold, notes: list) -> DType:
    """The type a tensor is written as when it is not converted (dtype=None's rule)."""
    src = t.dtype
    if len(t.shape) <= 1:
        return dtypes.F32
    if src is dtypes.F64:
        return dtypes.F32
    if src.name.startswith("F8_"):
        return dtypes.F16
    if can_hold(src) and row_fits(t.shape, src):
        return src
    notes.append(tensor_note(f"{src.name} tensors written as F32 (the format cannot store "
                             f"{src.name})", t.name, f"{src.name} cannot be stored; written as F32"))
    return dtypes.F32


def plan_mix(tensors, option: str, hparams, *, can_hold, overrides=None) -> TypePlan:
    """Types of a GGUF written as llama-quantize's `option` (q4_k_m, q8_0, ...): see the module doc.

    hparams: quant_mix.HParams; overrides: quant_mix.Overrides (ValueError for a type that does
    not fit a forced tensor, or an unknown type name).
    """
    ftype = option.lower()
    tensors = list(tensors)
    for t in tensors:
        _check_weight_type(t)
    mix = quant_mix.plan([(t.name, t.shape, t.dtype.name) for t in tensors], hparams, ftype, overrides)
    plan = TypePlan({}, option=ftype, ftype=mix.file_type)
    for f in mix.fallbacks:
        plan.notes.append(tensor_note(f"tensors written as {f.used} instead of {f.wanted}: rows not a multiple of "
                                      f"{quant_mix.BLOCK[f.wanted]}", f.name,
                                      f"{f.why}; written as {f.used} instead of {f.wanted}"))
    requantised: dict = {}
    targets = set()
    for t in tensors:
        if quant_mix.allows_quantization(t.name, t.shape, hparams.arch):
            target = codecs.get(mix.types[t.name]).dtype
        else:  # norms, biases, position embeddings...: as dtype=None keeps them
            target = _kept_type(t, can_hold, plan.notes)
        if target.quantized and t.dtype.quantized and t.dtype != target:
            requantised[t.dtype.name] = requantised.get(t.dtype.name, 0) + 1
            targets.add(target.name)
        plan.types[t.name] = target
        if len(t.shape) > 1:
            plan.matrix_sizes[t.name] = (target, t.n_elements)
    if requantised:
        what = " and ".join(f"{n} {src}" for src, n in requantised.items())
        into = ", ".join(sorted(targets))
        plan.notes.append(f"{what} tensors dequantised and re-quantised to {ftype} ({into}); quality is lower "
                          "than quantising the original f16/f32 weights")
    return plan


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
        _check_weight_type(t)
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
