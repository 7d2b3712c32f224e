"""wconv's one table of globals (`GLOBALS`), and the handlers for Python and numpy data.

The table is the allowlist both policies of the pickle machine (`pickle_vm`) use: loading
runs these handlers, scanning runs them too and calls everything else unsafe. The torch
entries (tensor rebuilding, storages, dtypes) come from `torch_tensors`.

Each handler receives the machine (`ctx`, for `fail`, `refuse`, `charge`, `call` and key
checks) and plain arguments, validates their types, and builds the value itself: nothing
here imports or calls what a pickle names. `ctx.fail` means "wconv cannot take these
arguments" (a format error); `ctx.refuse` means "this use could run code" (unsafe).
numpy scalars and arrays are decoded from their bytes with np.frombuffer; numpy's own
unpickling is never used.
"""
from __future__ import annotations

from collections import Counter, OrderedDict

import numpy as np

from ..errors import UnsupportedError
from .pickle_records import Global, GlobalSpec, Namespace, Pending, UnknownGlobal
from .torch_tensors import TORCH_GLOBALS, Storage

# Containers SETITEM/SETITEMS fill (and dict-like handler arguments).
DICT_TYPES = (dict, OrderedDict, Counter, Namespace)
# Our own types that may be dict keys / set elements besides scalars and tokens (hashed by identity).
KEY_TYPES = (Storage,)


def _arity(ctx, args, lo, hi, what):
    if not lo <= len(args) <= hi:
        ctx.fail(f"{what} called with {len(args)} arguments")


def _checked_items(ctx, iterable, what):
    if type(iterable) not in (list, tuple, set, frozenset):
        ctx.fail(f"{what} expects a list or tuple, got {type(iterable).__name__}")
    ctx.charge(len(iterable))
    ctx.check_keys(list(iterable))
    return iterable


def _make_dict_type(cls):
    def call(ctx, args):
        _arity(ctx, args, 0, 1, cls.__name__)
        out = cls()
        if args:
            pairs = args[0]
            if type(pairs) in DICT_TYPES:  # Counter pickles as Counter(dict)
                pairs = list(pairs.items())
            if type(pairs) not in (list, tuple):
                ctx.fail(f"{cls.__name__} expects a list of pairs")
            ctx.charge(len(pairs))
            for pair in pairs:
                if type(pair) not in (list, tuple) or len(pair) != 2:
                    ctx.fail(f"{cls.__name__} expects a list of pairs")
                ctx.check_key(pair[0])
                out[pair[0]] = pair[1]
        return out

    return call


def _defaultdict(ctx, args):
    # The default factory is never called by us, so the result is a plain dict.
    _arity(ctx, args, 0, 1, "defaultdict")
    if args and not (args[0] is None or type(args[0]) in (Global, UnknownGlobal)):
        ctx.fail("defaultdict factory is not a type")
    return {}


def _set(ctx, args):
    _arity(ctx, args, 0, 1, "set")
    return set(_checked_items(ctx, args[0], "set")) if args else set()


def _frozenset(ctx, args):
    _arity(ctx, args, 0, 1, "frozenset")
    return frozenset(_checked_items(ctx, args[0], "frozenset")) if args else frozenset()


def _slice(ctx, args):
    _arity(ctx, args, 1, 3, "slice")
    if not all(a is None or type(a) is int for a in args):
        ctx.fail("slice arguments must be integers or None")
    return slice(*args)


def _complex(ctx, args):
    _arity(ctx, args, 0, 2, "complex")
    if not all(type(a) in (int, float, bool) for a in args):
        ctx.fail("complex arguments must be numbers")
    return complex(*args)


def _latin1(ctx, args, what):
    # (str, "latin1") is how protocol 0-2 pickles spell bytes; (bytes,) is plain.
    if len(args) == 1 and type(args[0]) in (bytes, bytearray):
        ctx.charge(len(args[0]))
        return bytes(args[0])
    if len(args) == 2 and type(args[0]) is str and args[1] in ("latin1", "latin-1", "iso-8859-1"):
        ctx.charge(len(args[0]))
        try:
            return args[0].encode("latin-1")
        except UnicodeEncodeError:
            ctx.fail(f"{what}: text is not latin-1")
    if not args:
        return b""
    ctx.fail(f"{what} called with unsupported arguments")


def _codecs_encode(ctx, args):
    if len(args) != 2:
        ctx.fail("_codecs.encode expects (text, encoding)")
    return _latin1(ctx, args, "_codecs.encode")


def _bytearray(ctx, args):
    return bytearray(_latin1(ctx, args, "bytearray"))


def _bytes(ctx, args):
    return _latin1(ctx, args, "bytes")


def _namespace_new(ctx, args, kwargs):
    if args or kwargs:
        ctx.fail("argparse.Namespace with constructor arguments")
    return Namespace()


def _reconstructor(ctx, args):
    # copyreg._reconstructor(cls, object, None): protocol 0/1 spelling of cls.__new__(cls).
    # Any other base class would have its __new__/__init__ run by a real unpickler.
    if len(args) != 3 or args[1] != Global("builtins", "object") or args[2] is not None:
        ctx.refuse("copyreg._reconstructor with arguments other than (class, object, None)",
                   "refusing copyreg._reconstructor with unsupported arguments (it would run the base class's "
                   "constructor)")
    return ctx.call(args[0], (), new=True, op="copyreg._reconstructor")


def _plain_state(ctx, state, what):
    """The instance-dict part of a BUILD state. Slot state (setattr) and dunder names could
    retarget the object (e.g. its __class__) in a real unpickler: refused."""
    if type(state) is tuple and len(state) == 2:
        if state[1] is not None:
            reason = f"BUILD on {what} with slot state (setattr of arbitrary attributes)"
            ctx.refuse(reason, "refusing " + reason)
        state = state[0]
    if type(state) is dict:
        dunder = [k for k in state if type(k) is str and k.startswith("__")]
        if dunder:
            ctx.refuse(f"BUILD on {what} sets attribute {dunder[0]:.60}",
                       f"refusing BUILD on {what} that sets attribute {dunder[0]!r:.60}")
    return state


def _build_namespace(ctx, ns, state):
    state = _plain_state(ctx, state, "argparse.Namespace")
    if state is None:
        return None
    if type(state) is not dict or not all(type(k) is str for k in state):
        ctx.fail("argparse.Namespace state is not a dict of names")
    ns.update(state)
    return None


def _build_ordered_dict(ctx, od, state):
    # torch state dicts carry `_metadata` (per-module versions) as an attribute; keep only that.
    state = _plain_state(ctx, state, "collections.OrderedDict")
    if state is None:
        return None
    if type(state) is not dict:
        ctx.fail("OrderedDict state is not a dict")
    if "_metadata" in state:
        od._metadata = state["_metadata"]
    return None


# numpy: scalars and arrays decoded from their bytes; numpy's own unpickling is never used.
_NUMPY_TYPES = {"b1", "i1", "i2", "i4", "i8", "u1", "u2", "u4", "u8", "f2", "f4", "f8", "c8", "c16"}


class NumpyDtypeSpec:
    """numpy.dtype(typestr) as pickled; byte order arrives in a later BUILD."""

    __slots__ = ("typestr", "byteorder")

    def __init__(self, typestr):
        self.typestr = typestr
        self.byteorder = "="

    def dtype(self) -> np.dtype:
        return np.dtype(self.byteorder + self.typestr)


def _np_dtype(ctx, args):
    if not 1 <= len(args) <= 3 or type(args[0]) is not str:
        ctx.fail("numpy.dtype with unsupported arguments")
    typestr = args[0]
    if typestr not in _NUMPY_TYPES:
        ctx.fail(f"numpy dtype '{typestr}' is not supported (only plain numbers)", UnsupportedError)
    return NumpyDtypeSpec(typestr)


def _build_np_dtype(ctx, spec, state):
    if type(state) is not tuple or len(state) < 2 or state[1] not in ("<", ">", "|", "="):
        ctx.fail("numpy dtype state not understood")
    if len(state) >= 5 and any(s is not None for s in state[2:5]):
        ctx.fail("structured numpy dtypes are not supported", UnsupportedError)
    spec.byteorder = state[1]
    return None


def _np_scalar(ctx, args):
    if len(args) != 2 or type(args[0]) is not NumpyDtypeSpec:
        ctx.fail("numpy scalar with unsupported arguments")
    dt = args[0].dtype()
    raw = args[1]
    if type(raw) is str:
        raw = _latin1(ctx, (raw, "latin1"), "numpy scalar")
    if type(raw) is not bytes or len(raw) != dt.itemsize:
        ctx.fail("numpy scalar data has the wrong size")
    return np.frombuffer(raw, dtype=dt)[0].item()


class NumpyArrayPending(Pending):
    """numpy.core.multiarray._reconstruct(ndarray, ...): the array arrives in a later BUILD."""

    __slots__ = ()


def _np_reconstruct(origin):
    def call(ctx, args):
        if len(args) != 3 or args[0] != Global("numpy", "ndarray"):
            ctx.fail("numpy _reconstruct with unsupported arguments")
        return NumpyArrayPending(origin)

    return call


def _array_from_bytes(ctx, raw, dt: np.dtype, shape, fortran: bool):
    if type(shape) is not tuple or not all(type(s) is int and 0 <= s < 1 << 48 for s in shape):
        ctx.fail("numpy array shape not understood")
    n = 1
    for s in shape:
        n *= s
    if type(raw) is str:
        raw = _latin1(ctx, (raw, "latin1"), "numpy array")
    if type(raw) not in (bytes, bytearray) or len(raw) != n * dt.itemsize:
        ctx.fail("numpy array data does not match its shape")
    ctx.charge(len(raw))
    arr = np.frombuffer(bytes(raw), dtype=dt).reshape(shape, order="F" if fortran else "C")
    return arr.astype(dt.newbyteorder("="), copy=False) if not dt.isnative else arr


def _build_np_array(ctx, pending, state):
    if type(state) is not tuple or len(state) != 5 or state[0] != 1:
        ctx.fail("numpy array state not understood")
    _, shape, spec, fortran, raw = state
    if type(spec) is not NumpyDtypeSpec or type(fortran) is not bool:
        ctx.fail("numpy array state not understood")
    return _array_from_bytes(ctx, raw, spec.dtype(), shape, fortran)


def _np_frombuffer(ctx, args):
    # Protocol 5 in-band arrays: numpy.core.numeric._frombuffer(buffer, dtype, shape, order).
    if len(args) != 4 or type(args[1]) is not NumpyDtypeSpec or args[3] not in ("C", "F"):
        ctx.fail("numpy _frombuffer with unsupported arguments")
    return _array_from_bytes(ctx, args[0], args[1].dtype(), args[2], args[3] == "F")


def _token():
    return GlobalSpec()


def _python_and_numpy() -> dict:
    g = {
        ("collections", "OrderedDict"): GlobalSpec(call=_make_dict_type(OrderedDict), build=_build_ordered_dict,
                                                   makes=OrderedDict),
        ("collections", "Counter"): GlobalSpec(call=_make_dict_type(Counter)),
        ("collections", "defaultdict"): GlobalSpec(call=_defaultdict),
        ("builtins", "set"): GlobalSpec(call=_set),
        ("builtins", "frozenset"): GlobalSpec(call=_frozenset),
        ("builtins", "slice"): GlobalSpec(call=_slice),
        ("builtins", "complex"): GlobalSpec(call=_complex),
        ("builtins", "bytearray"): GlobalSpec(call=_bytearray),
        ("builtins", "bytes"): GlobalSpec(call=_bytes),
        ("_codecs", "encode"): GlobalSpec(call=_codecs_encode),
        ("copyreg", "_reconstructor"): GlobalSpec(call=_reconstructor),
        ("argparse", "Namespace"): GlobalSpec(new=_namespace_new, build=_build_namespace, makes=Namespace),
        ("numpy", "dtype"): GlobalSpec(call=_np_dtype, build=_build_np_dtype, makes=NumpyDtypeSpec),
        ("numpy", "ndarray"): _token(),
    }
    # Plain types, allowed only as inert tokens (e.g. a defaultdict factory); calling them is refused.
    for name in ("object", "dict", "list", "tuple", "int", "float", "str", "bool"):
        g[("builtins", name)] = _token()
    for mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
        g[(mod, "scalar")] = GlobalSpec(call=_np_scalar)
        g[(mod, "_reconstruct")] = GlobalSpec(call=_np_reconstruct(f"{mod}._reconstruct"), build=_build_np_array,
                                              makes=NumpyArrayPending)
    for mod in ("numpy.core.numeric", "numpy._core.numeric"):
        g[(mod, "_frombuffer")] = GlobalSpec(call=_np_frombuffer)
    return g


GLOBALS: dict = {**_python_and_numpy(), **TORCH_GLOBALS}  # (module, name) -> GlobalSpec
