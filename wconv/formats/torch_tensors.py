"""torch's data types, storages and the handlers that rebuild tensors from a pickle.

These are the torch entries of wconv's table of globals (`pickle_globals.GLOBALS`): tensor
rebuild functions become LazyTensors whose views are checked to stay inside their
storage, storage and dtype classes are inert `Marker`s, and persistent ids are checked to
be torch storages. The containers (`torch_file` for zip archives, `torch_legacy` for the
pre-1.6 stream) say where a storage's bytes are; nothing here reads a file.
"""
from __future__ import annotations

import math

import numpy as np

from .. import dtypes
from ..dtypes import DType
from ..errors import FormatError, UnsupportedError, WconvError
from ..tensor import FileSpan, LazyTensor
from .pickle_records import Global, GlobalSpec, Marker, UnknownGlobal, UnknownObject

_MAX_DIM = 1 << 62
MAX_EXPAND_BYTES = 1 << 28  # materialising a zero-stride view may grow it up to this (or 16x storage)

# --- dtypes --------------------------------------------------------------------------------

# torch dtype name -> wconv DType, for dtypes numpy can hold.
TORCH_DTYPES = {
    "float64": dtypes.F64, "float32": dtypes.F32, "float16": dtypes.F16, "bfloat16": dtypes.BF16,
    "int64": dtypes.I64, "int32": dtypes.I32, "int16": dtypes.I16, "int8": dtypes.I8,
    "uint64": dtypes.U64, "uint32": dtypes.U32, "uint16": dtypes.U16, "uint8": dtypes.U8,
    "bool": dtypes.BOOL, "complex64": dtypes.C64, "complex128": dtypes.C128,
    "float8_e4m3fn": dtypes.F8_E4M3, "float8_e5m2": dtypes.F8_E5M2,
    "float8_e4m3fnuz": dtypes.F8_E4M3FNUZ, "float8_e5m2fnuz": dtypes.F8_E5M2FNUZ,
    "complex32": dtypes.C32,
}
_ALIASES = {"double": "float64", "float": "float32", "half": "float16", "long": "int64", "int": "int32",
            "short": "int16", "cfloat": "complex64", "cdouble": "complex128", "chalf": "complex32"}
# torch dtypes recognised but with no numpy form here: name -> bytes per element.
_OTHER_DTYPES = {"float8_e8m0fnu": 1, "float4_e2m1fn_x2": 1, "bits8": 1, "bits16": 2, "bits1x8": 1,
                 "bits2x4": 1, "bits4x2": 1, "qint8": 1, "quint8": 1, "qint32": 4, "quint4x2": 1,
                 "quint2x4": 1}
_OTHER_DTYPES.update({f"uint{i}": 1 for i in range(1, 8)})
_OTHER_DTYPES.update({f"int{i}": 1 for i in range(1, 8)})
_OTHER = {name: DType(f"torch.{name}", np.dtype(np.uint8), size) for name, size in _OTHER_DTYPES.items()}

# Legacy typed storage classes -> element dtype name.
STORAGE_TYPES = {
    "DoubleStorage": "float64", "FloatStorage": "float32", "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16", "LongStorage": "int64", "IntStorage": "int32",
    "ShortStorage": "int16", "CharStorage": "int8", "ByteStorage": "uint8", "BoolStorage": "bool",
    "ComplexFloatStorage": "complex64", "ComplexDoubleStorage": "complex128",
    "QInt8Storage": "qint8", "QUInt8Storage": "quint8", "QInt32Storage": "qint32",
    "QUInt4x2Storage": "quint4x2", "QUInt2x4Storage": "quint2x4",
    "UntypedStorage": "uint8",
}


def dtype_by_torch_name(name: str) -> DType:
    name = _ALIASES.get(name, name)
    return TORCH_DTYPES.get(name) or _OTHER[name]


def has_numpy_form(dt: DType) -> bool:
    return dtypes.ALL.get(dt.name) is dt and dt is not dtypes.C32


# --- storages ------------------------------------------------------------------------------


class Storage:
    """One torch storage: `nbytes` bytes named `key` in the file, fetched only on request."""

    __slots__ = ("key", "dtype", "nbytes", "location", "source", "path", "big_endian", "fetch",
                 "locate", "base", "base_offset", "file_size")

    def __init__(self, key, dtype: DType, nbytes: int, location: str, source: str, path: str,
                 big_endian: bool = False):
        self.key = key
        self.dtype = dtype  # element type the file declares (uint8 for untyped storages)
        self.nbytes = nbytes
        self.location = location
        self.source = source
        self.path = path
        self.big_endian = big_endian
        self.fetch = None  # () -> buffer of at least nbytes; set by the container reader
        # Where the bytes lie, for copying them without numpy: `locate()` gives the file offset
        # of byte 0 when they are stored uncompressed (else None); a legacy storage view has
        # the root storage it is part of as `base`, at byte `base_offset` (views share bytes).
        self.locate = lambda: None
        self.base = self
        self.base_offset = 0
        self.file_size = None  # the container's size when it was opened (set with locate)

    def data(self):
        if self.fetch is None:
            raise FormatError(self.path, f"storage {self.key} has no data in the file")
        return self.fetch()

    def __repr__(self):
        return f"<Storage {self.key} {self.dtype.name} {self.nbytes} bytes>"


def _is_contiguous(shape, strides) -> bool:
    expected = 1
    for size, stride in zip(reversed(shape), reversed(strides)):
        if size != 1 and stride != expected:
            return False
        expected *= size
    return True


def negate(arr: np.ndarray, dt: DType) -> np.ndarray:
    # torch's neg bit: the stored values are the negation of the tensor's values.
    if dt is dtypes.BF16:
        return arr ^ np.uint16(0x8000)
    if dt.name.startswith("F8_"):
        flipped = arr ^ np.uint8(0x80)
        return np.where(arr == 0, arr, flipped) if dt.name.endswith("FNUZ") else flipped  # 0x80 is NaN there
    if dt is dtypes.BOOL:
        return arr
    return np.negative(arr)


def _load_view(storage: Storage, dt: DType, offset: int, shape: tuple, strides: tuple,
               conj: bool, neg: bool) -> np.ndarray:
    if not has_numpy_form(dt):
        raise UnsupportedError(storage.path, f"{storage.source}: tensor dtype {dt.name} has no numpy form; "
                                             "wconv cannot read its values")
    n = math.prod(shape)
    np_dt = dt.storage
    if n == 0:
        return np.empty(shape, dtype=np_dt)
    if storage.big_endian and np_dt.itemsize > 1:
        np_dt = np_dt.newbyteorder(">")
    itemsize = np_dt.itemsize
    buf = storage.data()
    elems = np.frombuffer(buf, dtype=np_dt, count=storage.nbytes // itemsize)
    if _is_contiguous(shape, strides):
        arr = elems[offset:offset + n].reshape(shape)
    else:
        if n * itemsize > max(16 * storage.nbytes, MAX_EXPAND_BYTES):
            raise UnsupportedError(storage.path, f"{storage.source}: expanded tensor view of shape {list(shape)} "
                                                 f"would need {n * itemsize} bytes from a {storage.nbytes}-byte storage")
        view = np.lib.stride_tricks.as_strided(elems[offset:], shape, [s * itemsize for s in strides],
                                               writeable=False)
        arr = np.ascontiguousarray(view)
    if not arr.dtype.isnative:
        arr = arr.astype(arr.dtype.newbyteorder("="))
    if neg:
        arr = negate(arr, dt)
    if conj and np.iscomplexobj(arr):
        arr = np.conj(arr)
    return arr


class StorageView:
    """A tensor's loader, keeping the view it reads: `storage`, element `offset`, `shape`,
    element `strides`, and torch's conj/neg bits (the safetensors mirror reads these to
    find tensors sharing bytes and to copy contiguous ones without numpy)."""

    __slots__ = ("storage", "dtype", "offset", "shape", "strides", "conj", "neg")

    def __init__(self, storage: Storage, dt: DType, offset: int, shape: tuple, strides: tuple,
                 conj: bool, neg: bool):
        self.storage, self.dtype, self.offset = storage, dt, offset
        self.shape, self.strides, self.conj, self.neg = shape, strides, conj, neg

    @property
    def contiguous(self) -> bool:
        return _is_contiguous(self.shape, self.strides)

    def byte_span(self) -> tuple[int, int]:
        """[begin, end) of the bytes this view touches, relative to its base storage."""
        size = self.dtype.itemsize
        begin = self.storage.base_offset + self.offset * size
        if math.prod(self.shape) == 0:
            return begin, begin
        last = self.offset + sum((s - 1) * st for s, st in zip(self.shape, self.strides))
        return begin, self.storage.base_offset + (last + 1) * size

    def __call__(self) -> np.ndarray:
        try:
            return _load_view(self.storage, self.dtype, self.offset, self.shape, self.strides, self.conj, self.neg)
        except WconvError:
            raise
        except (OSError, ValueError, TypeError, BufferError) as e:
            raise FormatError(self.storage.path, f"{self.storage.source}: cannot read tensor data: {e}") from None


# --- rebuild handlers (called by the pickle interpreter) -----------------------------------


def _int_tuple(ctx, value, what, *, allow_list=True) -> tuple:
    if type(value) not in ((tuple, list) if allow_list else (tuple,)):
        ctx.fail(f"tensor {what} is not a tuple of integers")
    for v in value:
        if type(v) is not int or not 0 <= v < _MAX_DIM:
            ctx.fail(f"tensor {what} {list(value)!r:.80} has a negative, huge or non-integer entry")
    if len(value) > 64:
        ctx.fail(f"tensor has {len(value)} dimensions")
    return tuple(value)


def make_tensor(ctx, storage, offset, size, stride, dt: DType, metadata=None) -> LazyTensor:
    """A LazyTensor viewing `storage`; the view is checked to stay inside the storage."""
    if type(storage) is not Storage:
        ctx.fail(f"tensor built from a {type(storage).__name__} instead of a storage")
    if type(offset) is not int or not 0 <= offset < _MAX_DIM:
        ctx.fail("tensor storage offset is negative, huge or not an integer")
    shape = _int_tuple(ctx, size, "size")
    strides = _int_tuple(ctx, stride, "stride")
    if len(shape) != len(strides):
        ctx.fail(f"tensor size {list(shape)} and stride {list(strides)} differ in length")
    conj = neg = False
    if metadata is not None:
        if not isinstance(metadata, dict):
            ctx.fail("tensor metadata is not a dict")
        conj, neg = bool(metadata.get("conj", False)), bool(metadata.get("neg", False))
    if math.prod(shape) > 0:
        last = offset + sum((s - 1) * st for s, st in zip(shape, strides))
        if (last + 1) * dt.itemsize > storage.nbytes:
            ctx.fail(f"tensor view (offset {offset}, size {list(shape)}, stride {list(strides)}, {dt.name}) "
                     f"reaches beyond its storage {storage.key} of {storage.nbytes} bytes")
    return LazyTensor("", dt, shape, StorageView(storage, dt, offset, shape, strides, conj, neg),
                      source=storage.source, storage_key=(storage.path, storage.key),
                      span=_span(storage, dt, offset, shape, strides, conj or neg))


def _span(storage, dt: DType, offset: int, shape: tuple, strides: tuple, changed: bool):
    """The tensor's file range, resolved on request, when its bytes are the stored bytes as they are."""
    if changed or not has_numpy_form(dt) or not _is_contiguous(shape, strides) or (storage.big_endian and dt.itemsize > 1):
        return None
    n = math.prod(shape)

    def span():
        start = storage.base.locate()  # (a legacy storage view lies inside its root storage)
        if start is None:
            return None
        return FileSpan(storage.path, start + storage.base_offset + offset * dt.itemsize, n * dt.itemsize,
                        storage.base.file_size)
    return span


def _storage_dtype(storage) -> DType:
    return storage.dtype if type(storage) is Storage else dtypes.U8


def _rebuild_tensor(ctx, args):
    if len(args) != 4:
        ctx.fail("_rebuild_tensor expects 4 arguments")
    return make_tensor(ctx, *args, _storage_dtype(args[0]))


def _rebuild_tensor_v2(ctx, args):
    # (storage, offset, size, stride, requires_grad, backward_hooks[, metadata])
    if len(args) not in (6, 7):
        ctx.fail("_rebuild_tensor_v2 expects 6 or 7 arguments")
    meta = args[6] if len(args) == 7 else None
    return make_tensor(ctx, args[0], args[1], args[2], args[3], _storage_dtype(args[0]), meta)


def _rebuild_tensor_v3(ctx, args):
    # (untyped storage, offset, size, stride, requires_grad, backward_hooks, dtype[, metadata])
    if len(args) not in (7, 8):
        ctx.fail("_rebuild_tensor_v3 expects 7 or 8 arguments")
    dt = args[6]
    if type(dt) is not Marker or dt.kind != "dtype":
        ctx.fail("_rebuild_tensor_v3 dtype argument is not a torch dtype")
    meta = args[7] if len(args) == 8 else None
    return make_tensor(ctx, args[0], args[1], args[2], args[3], _dtype_of(dt), meta)


def _dtype_of(marker: Marker) -> DType:
    return dtype_by_torch_name(marker.name[len("torch."):])


def _is_tensor_like(x) -> bool:
    return type(x) in (LazyTensor, UnknownObject)


def _rebuild_parameter(ctx, args):
    # nn.Parameter(data, requires_grad, hooks[, state]): the data is the tensor we keep.
    if len(args) not in (3, 4) or not _is_tensor_like(args[0]):
        ctx.fail("_rebuild_parameter expects a tensor")
    return args[0]


_TENSOR_TYPES = {Global("torch", "Tensor"), Global("torch.nn.parameter", "Parameter"),
                 Global("torch.nn", "Parameter")}


def _rebuild_from_type(ctx, args):
    # (rebuild function, tensor class, its args, python attributes): attributes are dropped.
    if len(args) != 4 or type(args[2]) is not tuple:
        ctx.fail("_rebuild_from_type expects (function, type, args, state)")
    func, cls = args[0], args[1]
    if type(func) is not Global or func.module != "torch._utils":
        ctx.fail("_rebuild_from_type with a function that does not rebuild a tensor")
    if cls not in _TENSOR_TYPES and type(cls) is not UnknownGlobal:
        ctx.fail(f"_rebuild_from_type of unsupported type {cls}")
    return ctx.call(func, args[2], op="torch._tensor._rebuild_from_type")


def _rebuild_meta_tensor(ctx, args):
    # (dtype, size, stride, requires_grad): a tensor on the "meta" device has no data.
    if len(args) != 4 or type(args[0]) is not Marker or args[0].kind != "dtype":
        ctx.fail("_rebuild_meta_tensor_no_storage expects (dtype, size, stride, requires_grad)")
    dt = _dtype_of(args[0])
    shape = _int_tuple(ctx, args[1], "size")
    path = ctx.path

    def load():
        raise UnsupportedError(path, "tensor was saved on the meta device: it has no data")

    return LazyTensor("", dt, shape, load, source="meta")


def _rebuild_device_tensor_from_cpu_tensor(ctx, args):
    # (cpu tensor, dtype, device, requires_grad): data was copied to CPU when saving.
    if len(args) != 4 or type(args[0]) is not LazyTensor:
        ctx.fail("_rebuild_device_tensor_from_cpu_tensor expects a tensor")
    return args[0]


def _rebuild_device_tensor_from_numpy(ctx, args):
    # (ndarray, dtype, device, requires_grad), written for XLA devices by old torch.
    if len(args) != 4 or type(args[0]) is not np.ndarray or type(args[1]) is not Marker:
        ctx.fail("_rebuild_device_tensor_from_numpy expects (ndarray, dtype, ...)")
    arr = args[0]
    dt = _dtype_of(args[1])
    if not has_numpy_form(dt) or arr.dtype != dt.storage:
        ctx.fail("_rebuild_device_tensor_from_numpy: array and dtype disagree")
    return LazyTensor("", dt, arr.shape, lambda: arr, source="numpy")


def _unsupported(what):
    def call(ctx, args):
        ctx.fail(f"{what} are not supported", UnsupportedError)

    return call


def _size(ctx, args):
    if len(args) != 1:
        ctx.fail("torch.Size expects one tuple")
    return _int_tuple(ctx, args[0], "size")


def _device(ctx, args):
    if len(args) == 1 and type(args[0]) is str:
        return args[0]
    if len(args) == 2 and type(args[0]) is str and (args[1] is None or type(args[1]) is int):
        return args[0] if args[1] is None else f"{args[0]}:{args[1]}"
    ctx.fail("torch.device with unsupported arguments")


def _get_layout(ctx, args):
    if len(args) != 1 or type(args[0]) is not str:
        ctx.fail("torch.serialization._get_layout expects a name")
    return Marker("layout", args[0])


def _torch_globals() -> dict:
    g = {}
    utils = "torch._utils"
    g[(utils, "_rebuild_tensor")] = GlobalSpec(call=_rebuild_tensor)
    g[(utils, "_rebuild_tensor_v2")] = GlobalSpec(call=_rebuild_tensor_v2)
    g[(utils, "_rebuild_tensor_v3")] = GlobalSpec(call=_rebuild_tensor_v3)
    g[(utils, "_rebuild_parameter")] = GlobalSpec(call=_rebuild_parameter)
    g[(utils, "_rebuild_parameter_with_state")] = GlobalSpec(call=_rebuild_parameter)
    g[(utils, "_rebuild_meta_tensor_no_storage")] = GlobalSpec(call=_rebuild_meta_tensor)
    g[(utils, "_rebuild_device_tensor_from_cpu_tensor")] = GlobalSpec(call=_rebuild_device_tensor_from_cpu_tensor)
    g[(utils, "_rebuild_device_tensor_from_numpy")] = GlobalSpec(call=_rebuild_device_tensor_from_numpy)
    for name, what in (("_rebuild_qtensor", "quantized tensors (torch.quantize_per_*)"),
                       ("_rebuild_sparse_tensor", "sparse tensors"),
                       ("_rebuild_sparse_csr", "sparse tensors"),
                       ("_rebuild_nested_tensor", "nested tensors"),
                       ("_rebuild_wrapper_subclass", "tensor subclasses without storage"),
                       ("_rebuild_xla_tensor", "XLA tensors"),
                       ("_rebuild_mps_tensor", "MPS tensors")):
        g[(utils, name)] = GlobalSpec(call=_unsupported(what))
    g[("torch._tensor", "_rebuild_from_type_v2")] = GlobalSpec(call=_rebuild_from_type)
    g[("torch._tensor", "_rebuild_from_type")] = GlobalSpec(call=_rebuild_from_type)
    for cls in _TENSOR_TYPES:
        g[(cls.module, cls.name)] = GlobalSpec()
    g[("torch", "Size")] = GlobalSpec(call=_size)
    g[("torch", "device")] = GlobalSpec(call=_device)
    g[("torch.serialization", "_get_layout")] = GlobalSpec(call=_get_layout)
    for name in list(TORCH_DTYPES) + list(_ALIASES) + list(_OTHER_DTYPES):
        g[("torch", name)] = GlobalSpec(value=Marker("dtype", "torch." + _ALIASES.get(name, name)))
    for name in STORAGE_TYPES:
        for module in ("torch", "torch.cuda", "torch.storage"):
            g[(module, name)] = GlobalSpec(value=Marker("storage_type", name))
    for name in ("strided", "sparse_coo", "sparse_csr", "sparse_csc", "sparse_bsr", "sparse_bsc", "_mkldnn"):
        g[("torch", name)] = GlobalSpec(value=Marker("layout", "torch." + name))
    for name in ("contiguous_format", "channels_last", "channels_last_3d", "preserve_format"):
        g[("torch", name)] = GlobalSpec(value=Marker("memory_format", "torch." + name))
    for name in ("per_tensor_affine", "per_tensor_symmetric", "per_channel_affine", "per_channel_symmetric",
                 "per_channel_affine_float_qparams"):
        g[("torch", name)] = GlobalSpec(value=Marker("qscheme", "torch." + name))
    return g


TORCH_GLOBALS = _torch_globals()  # the torch part of pickle_globals.GLOBALS


def storage_pid(ctx, pid, *, legacy: bool):
    """Check a persistent id's shape: ('storage', type, key, location, numel[, view]).

    Returns (dtype, key, location, numel), or None for a legacy pickled nn.Module class
    (tolerated only with allow_unknown_globals)."""
    n = 6 if legacy else 5
    if type(pid) is not tuple or len(pid) != n or pid[0] != "storage":
        if legacy and type(pid) is tuple and pid[:1] == ("module",):
            if ctx.allow_unknown_globals:
                return None
            ctx.refuse("persistent id of a pickled nn.Module class with its source code (torch.load would "
                       "rebuild the class)", "file contains a pickled nn.Module class with its source code; refusing it")
        ctx.fail(f"persistent id of unknown shape ({type(pid).__name__} "
                 f"{'of ' + str(len(pid)) if isinstance(pid, tuple) else ''}): not a torch storage")
    stype, key, location, numel = pid[1:5]
    if type(stype) is not Marker or stype.kind != "storage_type":
        ctx.fail("persistent id names an unknown storage type")
    if type(key) is not str or not 0 < len(key) <= 256 or type(location) is not str:
        ctx.fail("persistent id has a bad storage key or location")
    if type(numel) is not int or not 0 <= numel < _MAX_DIM:
        ctx.fail("persistent id has a bad element count")
    return dtype_by_torch_name(STORAGE_TYPES[stype.name]), key, location, numel

