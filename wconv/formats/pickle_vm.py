"""A restricted pickle interpreter: reads pickles as data and never runs code from them.

Python's own Unpickler imports whatever module a pickle names and calls it; even with
`find_class` restricted, BUILD sets attributes and REDUCE calls what was resolved. Here
every global is an inert token. REDUCE, NEWOBJ and BUILD dispatch by (module, name) or by
our own object type to handler functions written in this package; a global without an
entry in the allowlist is refused (UnsafeFileError) before anything else happens, or, with
`allow_unknown_globals=True`, becomes an `UnknownGlobal` whose "calls" produce inert
`UnknownObject` records (for inspection only; nothing is ever called).

Crafted pickles cannot exhaust memory or time: opcodes, memo entries, stack height,
integer sizes and the work done by handlers are bounded (see `Limits`), dict keys are
restricted to types whose hashing is cheap and collision-safe, and the finished object
graph is checked for cycles and nesting depth so callers can walk it recursively.

`iter_opcodes` and `scan` decode a pickle without executing it (for `wconv scan`).
The handlers for Python and numpy data types live in `pickle_globals`; torch's in
`torch_file`.
"""
from __future__ import annotations

import codecs
import struct
from collections import Counter, OrderedDict
from dataclasses import dataclass
from typing import Callable, Iterator

from ..errors import FormatError, UnsafeFileError, UnsupportedError, WconvError

# --- limits ----------------------------------------------------------------------------


@dataclass
class Limits:
    """Resource bounds for one pickle. Real checkpoints stay far below every one."""

    max_ops: int = 50_000_000
    max_memo: int = 4_000_000
    max_stack: int = 4_000_000
    max_marks: int = 100_000  # MARK nesting
    max_long_bytes: int = 1024  # LONG1/LONG4 payload; text INT/LONG lines are capped by max_line
    max_line: int = 4096  # text opcodes (protocol 0 ints, floats, GLOBAL names)
    max_depth: int = 200  # nesting of the finished object graph
    max_key_items: int = 4096  # elements in one tuple used as a dict key
    work_base: int = 1 << 22  # handler work units (items checked, bytes copied) allowed up front...
    work_per_byte: int = 8  # ...plus this many per pickle byte consumed (about 0.1 us each)


DEFAULT_LIMITS = Limits()
_MAX_SAFE_KEY_INT = (1 << 61) - 2  # ints in this range hash to themselves: no crafted collisions

# --- inert objects the interpreter produces ----------------------------------------------


@dataclass(frozen=True)
class Global:
    """An allowlisted global, as a token. Calling it means running *our* handler."""

    module: str
    name: str

    def __str__(self) -> str:
        return f"{self.module}.{self.name}"


@dataclass(frozen=True)
class UnknownGlobal:
    """A global outside the allowlist (only with allow_unknown_globals). Never resolved."""

    module: str
    name: str

    def __str__(self) -> str:
        return f"{self.module}.{self.name}"


class UnknownObject:
    """What REDUCE/NEWOBJ/BUILD on an UnknownGlobal would have produced: a record, not an object."""

    __slots__ = ("cls", "args", "kwargs", "state", "items", "dict_items")

    def __init__(self, cls, args=(), kwargs=None):
        self.cls = cls
        self.args = args
        self.kwargs = kwargs
        self.state = None
        self.items = []  # APPEND/APPENDS/ADDITEMS on it
        self.dict_items = []  # SETITEM/SETITEMS on it, as (key, value) pairs

    def __repr__(self) -> str:
        return f"<UnknownObject {self.cls}>"


@dataclass(frozen=True)
class Marker:
    """A named constant such as a torch dtype or layout (`kind` says which)."""

    kind: str
    name: str

    def __str__(self) -> str:
        return self.name


class Namespace(dict):
    """argparse.Namespace contents, as a plain dict."""


@dataclass
class GlobalSpec:
    """How one allowlisted global behaves.

    `value`: what the GLOBAL opcode pushes (None: a `Global` token).
    `call(ctx, args)`: REDUCE handler. `new(ctx, args, kwargs)`: NEWOBJ handler.
    """

    value: object = None
    call: Callable | None = None
    new: Callable | None = None


class _Pending:
    """An object completed by a later BUILD (numpy arrays); must not leak into results."""

    __slots__ = ("memo_keys",)

    def __init__(self):
        self.memo_keys = []


# --- opcodes -----------------------------------------------------------------------------

_OPNAMES = {
    b"(": "MARK", b".": "STOP", b"0": "POP", b"1": "POP_MARK", b"2": "DUP", b"F": "FLOAT",
    b"I": "INT", b"J": "BININT", b"K": "BININT1", b"L": "LONG", b"M": "BININT2", b"N": "NONE",
    b"P": "PERSID", b"Q": "BINPERSID", b"R": "REDUCE", b"S": "STRING", b"T": "BINSTRING",
    b"U": "SHORT_BINSTRING", b"V": "UNICODE", b"X": "BINUNICODE", b"a": "APPEND", b"b": "BUILD",
    b"c": "GLOBAL", b"d": "DICT", b"}": "EMPTY_DICT", b"e": "APPENDS", b"g": "GET", b"h": "BINGET",
    b"i": "INST", b"j": "LONG_BINGET", b"l": "LIST", b"]": "EMPTY_LIST", b"o": "OBJ", b"p": "PUT",
    b"q": "BINPUT", b"r": "LONG_BINPUT", b"s": "SETITEM", b"t": "TUPLE", b")": "EMPTY_TUPLE",
    b"u": "SETITEMS", b"G": "BINFLOAT", b"\x80": "PROTO", b"\x81": "NEWOBJ", b"\x82": "EXT1",
    b"\x83": "EXT2", b"\x84": "EXT4", b"\x85": "TUPLE1", b"\x86": "TUPLE2", b"\x87": "TUPLE3",
    b"\x88": "NEWTRUE", b"\x89": "NEWFALSE", b"\x8a": "LONG1", b"\x8b": "LONG4", b"B": "BINBYTES",
    b"C": "SHORT_BINBYTES", b"\x8c": "SHORT_BINUNICODE", b"\x8d": "BINUNICODE8",
    b"\x8e": "BINBYTES8", b"\x8f": "EMPTY_SET", b"\x90": "ADDITEMS", b"\x91": "FROZENSET",
    b"\x92": "NEWOBJ_EX", b"\x93": "STACK_GLOBAL", b"\x94": "MEMOIZE", b"\x95": "FRAME",
    b"\x96": "BYTEARRAY8", b"\x97": "NEXT_BUFFER", b"\x98": "READONLY_BUFFER",
}
OPNAMES = {k[0]: v for k, v in _OPNAMES.items()}  # opcode byte value -> name
_OP = {v: k for k, v in OPNAMES.items()}  # name -> byte value

# Argument encodings: how many bytes follow the opcode, and how to read them.
_FIXED = {"BININT": "<i", "BININT1": "<B", "BININT2": "<H", "BINFLOAT": ">d", "BINGET": "<B",
          "LONG_BINGET": "<I", "BINPUT": "<B", "LONG_BINPUT": "<I", "PROTO": "<B", "EXT1": "<B",
          "EXT2": "<H", "EXT4": "<i", "FRAME": "<Q"}
_COUNTED = {  # name -> (length prefix format, kind)
    "BINSTRING": ("<i", "str8"), "SHORT_BINSTRING": ("<B", "str8"),
    "BINBYTES": ("<I", "bytes"), "SHORT_BINBYTES": ("<B", "bytes"), "BINBYTES8": ("<Q", "bytes"),
    "BINUNICODE": ("<I", "utf8"), "SHORT_BINUNICODE": ("<B", "utf8"), "BINUNICODE8": ("<Q", "utf8"),
    "BYTEARRAY8": ("<Q", "bytearray"), "LONG1": ("<B", "long"), "LONG4": ("<i", "long"),
}
_LINE1 = {"INT", "LONG", "FLOAT", "STRING", "UNICODE", "GET", "PUT", "PERSID"}
_LINE2 = {"GLOBAL", "INST"}
_NO_ARG = set(OPNAMES.values()) - set(_FIXED) - set(_COUNTED) - _LINE1 - _LINE2


class _Bad(Exception):
    """Internal: malformed pickle; converted to FormatError with file and position."""


def _read_line(data, pos: int, end: int, max_line: int) -> tuple[bytes, int]:
    # Lines are short in practice: look at 64 bytes first, the whole allowance only if needed.
    for width in (64, max_line + 1):
        stop = min(end, pos + width)
        chunk = bytes(data[pos:stop])
        nl = chunk.find(b"\n")
        if nl >= 0:
            return chunk[:nl], pos + nl + 1
    raise _Bad("unterminated text argument" if stop == end else "text argument too long")


def _decode_string_literal(line: bytes) -> bytes:
    # Protocol 0 STRING: a Python 2 repr, quoted with ' or ".
    if len(line) < 2 or line[:1] != line[-1:] or line[:1] not in (b"'", b'"'):
        raise _Bad("STRING argument is not quoted")
    return codecs.escape_decode(line[1:-1])[0]


def _decode_arg(name: str, data, pos: int, end: int, limits: Limits):
    """(argument, new position) of the opcode `name` whose argument starts at `pos`."""
    if name in _NO_ARG:
        return None, pos
    if name in _FIXED:
        fmt = _FIXED[name]
        size = struct.calcsize(fmt)
        if pos + size > end:
            raise _Bad(f"{name} argument runs past the end of the data")
        return struct.unpack_from(fmt, data, pos)[0], pos + size
    if name in _COUNTED:
        fmt, kind = _COUNTED[name]
        size = struct.calcsize(fmt)
        if pos + size > end:
            raise _Bad(f"{name} length runs past the end of the data")
        n = struct.unpack_from(fmt, data, pos)[0]
        pos += size
        if n < 0:
            raise _Bad(f"{name} has a negative length")
        if kind == "long" and n > limits.max_long_bytes:
            raise _Bad(f"{name} integer of {n} bytes exceeds the limit of {limits.max_long_bytes}")
        if n > end - pos:
            raise _Bad(f"{name} of {n} bytes runs past the end of the data")
        raw = bytes(data[pos:pos + n])
        pos += n
        if kind == "bytes":
            return raw, pos
        if kind == "bytearray":
            return bytearray(raw), pos
        if kind == "long":
            return int.from_bytes(raw, "little", signed=True), pos
        if kind == "utf8":
            return raw.decode("utf-8", "surrogatepass"), pos
        return raw, pos  # str8: Python 2 str, decoded by the caller
    if name in _LINE1:
        line, pos = _read_line(data, pos, end, limits.max_line)
        if name == "INT":
            if line == b"01":
                return True, pos
            if line == b"00":
                return False, pos
            return int(line), pos
        if name == "LONG":
            return int(line[:-1] if line.endswith(b"L") else line), pos
        if name == "FLOAT":
            return float(line), pos
        if name == "STRING":
            return _decode_string_literal(line), pos
        if name == "UNICODE":
            return line.decode("raw-unicode-escape"), pos
        if name in ("GET", "PUT"):
            return int(line), pos
        return line.decode("ascii"), pos  # PERSID
    if name in _LINE2:
        module, pos = _read_line(data, pos, end, limits.max_line)
        qual, pos = _read_line(data, pos, end, limits.max_line)
        return (module.decode("utf-8"), qual.decode("utf-8")), pos
    return None, pos


@dataclass
class Op:
    pos: int
    name: str
    arg: object = None


def iter_opcodes(data, start: int = 0, *, path=None, limits: Limits = DEFAULT_LIMITS) -> Iterator[Op]:
    """Decode opcodes from `start` up to and including STOP, without executing anything."""
    end = len(data)
    pos = start
    count = 0
    while True:
        if pos >= end:
            raise FormatError(path, f"pickle at byte {start} is truncated (no STOP opcode)")
        code = data[pos]
        name = OPNAMES.get(code)
        if name is None:
            raise FormatError(path, f"bad pickle: unknown opcode 0x{code:02x} at byte {pos}")
        count += 1
        if count > limits.max_ops:
            raise FormatError(path, f"pickle exceeds {limits.max_ops} opcodes")
        try:
            arg, new = _decode_arg(name, data, pos + 1, end, limits)
        except (_Bad, ValueError, UnicodeDecodeError, struct.error) as e:
            raise FormatError(path, f"bad pickle at byte {pos} ({name}): {e}") from None
        yield Op(pos, name, arg)
        if name == "STOP":
            return
        pos = new


@dataclass
class ScanResult:
    globals: list  # (module, name) in order of appearance; ("?", "?") when not resolvable
    opcodes: Counter
    protocol: int
    end: int  # position after STOP


_STRING_OPS = {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "STRING", "BINSTRING",
               "SHORT_BINSTRING"}


def _stack_effects():
    import pickletools  # stdlib opcode metadata (stack before/after), used as data only

    out = {}
    for od in pickletools.opcodes:
        before = od.stack_before
        mark = pickletools.markobject in before
        pops = len([b for b in before if b not in (pickletools.markobject, pickletools.stackslice)])
        out[od.name] = (mark, pops, len(od.stack_after))
    return out


_EFFECTS = None


def scan(data, start: int = 0, *, path=None, limits: Limits = DEFAULT_LIMITS) -> ScanResult:
    """Globals and opcode counts of one pickle, found by symbolic execution (nothing runs).

    Only strings are tracked on the symbolic stack (through the memo too), which is what
    STACK_GLOBAL needs; a STACK_GLOBAL whose operands are not plain strings is reported
    as ("?", "?") so a scanner can treat it as unsafe.
    """
    global _EFFECTS
    if _EFFECTS is None:
        _EFFECTS = _stack_effects()
    other = object()
    stack, marks, memo = [], [], {}
    found, counts, proto, end = [], Counter(), 0, start
    for op in iter_opcodes(data, start, path=path, limits=limits):
        counts[op.name] += 1
        name = op.name
        if name == "PROTO":
            proto = op.arg
        if name == "STOP":
            end = op.pos + 1
            break
        if name in ("GLOBAL", "INST"):
            found.append(tuple(op.arg))
        if name == "STACK_GLOBAL":
            qual = stack.pop() if stack else other
            module = stack.pop() if stack else other
            ok = isinstance(module, str) and isinstance(qual, str)
            found.append((module, qual) if ok else ("?", "?"))
            stack.append(other)
            continue
        if name in ("PUT", "BINPUT", "LONG_BINPUT"):
            memo[op.arg] = stack[-1] if stack else other
            continue
        if name == "MEMOIZE":
            memo[len(memo)] = stack[-1] if stack else other
            continue
        if name in ("GET", "BINGET", "LONG_BINGET"):
            stack.append(memo.get(op.arg, other))
            continue
        if name == "DUP":
            stack.append(stack[-1] if stack else other)
            continue
        if name == "MARK":
            marks.append(len(stack))
            continue
        if name in _STRING_OPS:
            stack.append(op.arg if isinstance(op.arg, str) else other)
            continue
        mark, pops, pushes = _EFFECTS[name]
        if mark:
            del stack[marks.pop() if marks else 0:]
        for _ in range(pops):
            if stack:
                stack.pop()
        stack.extend([other] * pushes)
        if len(stack) > limits.max_stack:
            raise FormatError(path, "pickle stack exceeds its limit")
    return ScanResult(found, counts, proto, end)


def list_globals(data, start: int = 0, *, path=None) -> list:
    """The (module, name) pairs a pickle references, without executing it."""
    return scan(data, start, path=path).globals


# --- the interpreter ---------------------------------------------------------------------

_SCALAR_KEYS = (str, bytes, float, bool, type(None), complex)
_TOKEN_KEYS = (Global, UnknownGlobal, UnknownObject, Marker)


class Unpickler:
    """Run one pickle as data. `globals_` maps (module, name) -> GlobalSpec (the allowlist).

    `build_handlers` maps one of our own types to `fn(ctx, obj, state) -> replacement or None`.
    `persistent_load(ctx, pid)` resolves PERSID/BINPERSID (torch storages).
    """

    def __init__(self, data, *, path=None, where: str = "pickle", start: int = 0, end: int | None = None,
                 globals_: dict | None = None, build_handlers: dict | None = None,
                 persistent_load: Callable | None = None, allow_unknown_globals: bool = False,
                 limits: Limits | None = None, extra_key_types: tuple = ()):
        self.data = data
        self.path = path
        self.where = where
        self.start = start
        self.end = len(data) if end is None else end
        if globals_ is None or build_handlers is None:
            from .pickle_globals import BASE_BUILD, BASE_GLOBALS
        self.globals = BASE_GLOBALS if globals_ is None else globals_
        self.build_handlers = BASE_BUILD if build_handlers is None else build_handlers
        self.persistent_load = persistent_load
        self.allow_unknown_globals = allow_unknown_globals
        self.limits = limits or DEFAULT_LIMITS
        self.key_types = _TOKEN_KEYS + tuple(extra_key_types)
        # Types hashed in O(1) by value or by identity (frozensets cache their hash).
        self._fast_key_types = frozenset(_SCALAR_KEYS + self.key_types + (frozenset,))
        self.stack: list = []
        self.marks: list = []
        self.floor = 0  # items below the innermost MARK are invisible, as in CPython
        self.memo: dict = {}
        self.proto = 0
        self.pos = start
        self.op_pos = start
        self.ops = 0
        self.work = 0
        self.globals_seen: list = []  # "module.name", first appearance order
        self.unknown_globals: list = []
        self.end_pos = None  # position after STOP

    # -- errors and accounting, for handlers too --
    def fail(self, message: str, cls=FormatError):
        raise cls(self.path, f"{self.where}: {message}")

    def charge(self, amount: int) -> None:
        """Account handler work (items hashed, bytes copied) against the budget."""
        self.work += amount
        budget = self.limits.work_base + self.limits.work_per_byte * (self.pos - self.start)
        if self.work > budget:
            self.fail("pickle needs more work than its size allows (crafted to exhaust memory or time?)")

    def check_keys(self, keys) -> None:
        """check_key for many keys; the common all-strings / small-ints case stays in C."""
        types = set(map(type, keys))
        if types <= self._fast_key_types:
            return
        if types <= self._fast_key_types | {int}:
            ints = [k for k in keys if type(k) is int]
            if -_MAX_SAFE_KEY_INT <= min(ints) and max(ints) <= _MAX_SAFE_KEY_INT:
                return
        for k in keys:
            self.check_key(k)

    def check_key(self, key) -> None:
        """Refuse dict keys / set elements whose hashing could be slow or crafted to collide."""
        t = type(key)
        if t in self._fast_key_types:
            return
        if t is int:
            if -_MAX_SAFE_KEY_INT <= key <= _MAX_SAFE_KEY_INT:
                return
            self.fail("integer dict key or set element out of the supported range")
        if t is tuple:
            todo, seen = [(key, 0)], 0
            while todo:
                tup, depth = todo.pop()
                if depth > 16:
                    self.fail("tuple used as a dict key is nested too deeply")
                for item in tup:
                    seen += 1
                    if seen > self.limits.max_key_items:
                        self.fail("tuple used as a dict key is too large")
                    if type(item) is tuple:
                        todo.append((item, depth + 1))
                    elif type(item) is int and not -_MAX_SAFE_KEY_INT <= item <= _MAX_SAFE_KEY_INT:
                        self.fail("integer in a dict key out of the supported range")
                    elif not (type(item) in _SCALAR_KEYS or type(item) in (int, frozenset)
                              or isinstance(item, self.key_types)):
                        self.fail(f"unhashable {type(item).__name__} inside a dict key")
            self.charge(seen)
            return
        self.fail(f"{t.__name__} cannot be a dict key or set element")

    # -- stack helpers --
    def _push(self, obj):
        self.stack.append(obj)

    def _pop(self):
        if len(self.stack) <= self.floor:
            raise _Bad("stack underflow")
        return self.stack.pop()

    def _top(self):
        if len(self.stack) <= self.floor:
            raise _Bad("stack underflow")
        return self.stack[-1]

    def _pop_mark(self) -> list:
        if not self.marks:
            raise _Bad("MARK expected but not found")
        i = self.marks.pop()
        items = self.stack[i:]
        del self.stack[i:]
        self.floor = self.marks[-1] if self.marks else 0
        return items

    # -- main loop --
    def load(self):
        data, end, limits, stack = self.data, self.end, self.limits, self.stack
        max_ops, max_stack = limits.max_ops, limits.max_stack
        dispatch = {code: (name, getattr(self, "op_" + name)) for code, name in OPNAMES.items()}
        self.pos = self.start
        try:
            while self.end_pos is None:
                if self.pos >= end:
                    raise _Bad("truncated (no STOP opcode)")
                self.op_pos = self.pos
                code = data[self.pos]
                entry = dispatch.get(code)
                if entry is None:
                    raise _Bad(f"unknown opcode 0x{code:02x}")
                self.ops += 1
                if self.ops > max_ops:
                    raise _Bad(f"more than {max_ops} opcodes")
                arg, self.pos = _decode_arg(entry[0], data, self.pos + 1, end, limits)
                entry[1](arg)
                if len(stack) > max_stack:
                    raise _Bad(f"stack exceeds {max_stack} items")
        except WconvError:
            raise
        except RecursionError:
            self.fail(f"bad pickle at byte {self.op_pos}: nested too deeply")
        except MemoryError:
            self.fail(f"bad pickle at byte {self.op_pos}: out of memory", UnsupportedError)
        except (_Bad, ValueError, TypeError, KeyError, IndexError, AttributeError, OverflowError,
                UnicodeError, struct.error) as e:
            op = OPNAMES.get(data[self.op_pos], "?") if self.op_pos < end else "end of data"
            self.fail(f"bad pickle at byte {self.op_pos} ({op}): {e}")
        result = self.stack.pop()
        check_graph(result, self)
        return result

    # -- opcodes: stack shuffling --
    def op_MARK(self, _):
        if len(self.marks) >= self.limits.max_marks:
            raise _Bad("MARK nested too deeply")
        self.marks.append(len(self.stack))
        self.floor = len(self.stack)

    def op_STOP(self, _):
        if self.marks or len(self.stack) != 1:
            raise _Bad("STOP with an unbalanced stack")
        self.end_pos = self.pos

    def op_POP(self, _):
        if self.marks and len(self.stack) == self.floor:
            self._pop_mark()  # CPython: POP on an empty frame discards the mark
        else:
            self._pop()

    def op_POP_MARK(self, _):
        self._pop_mark()

    def op_DUP(self, _):
        self._push(self._top())

    def op_PROTO(self, v):
        if v > 5:
            raise _Bad(f"unsupported pickle protocol {v}")
        self.proto = v

    def op_FRAME(self, n):
        if n > self.end - self.pos:
            raise _Bad("FRAME runs past the end of the data")

    # -- opcodes: scalars --
    def _push_arg(self, v):
        self._push(v)

    op_INT = op_BININT = op_BININT1 = op_BININT2 = op_LONG = op_LONG1 = op_LONG4 = _push_arg
    op_FLOAT = op_BINFLOAT = _push_arg
    op_BINBYTES = op_SHORT_BINBYTES = op_BINBYTES8 = op_BYTEARRAY8 = _push_arg
    op_UNICODE = op_BINUNICODE = op_SHORT_BINUNICODE = op_BINUNICODE8 = _push_arg

    def _push_str8(self, raw: bytes):
        # Python 2 str: text in practice; keep undecodable ones as bytes.
        try:
            self._push(raw.decode("utf-8"))
        except UnicodeDecodeError:
            self._push(raw)

    op_STRING = op_BINSTRING = op_SHORT_BINSTRING = _push_str8

    def op_NONE(self, _):
        self._push(None)

    def op_NEWTRUE(self, _):
        self._push(True)

    def op_NEWFALSE(self, _):
        self._push(False)

    # -- opcodes: containers --
    def op_EMPTY_TUPLE(self, _):
        self._push(())

    def op_TUPLE(self, _):
        self._push(tuple(self._pop_mark()))

    def op_TUPLE1(self, _):
        self._push((self._pop(),))

    def op_TUPLE2(self, _):
        b = self._pop()
        self._push((self._pop(), b))

    def op_TUPLE3(self, _):
        c = self._pop()
        b = self._pop()
        self._push((self._pop(), b, c))

    def op_EMPTY_LIST(self, _):
        self._push([])

    def op_LIST(self, _):
        self._push(self._pop_mark())

    def _append_to(self, target, items):
        if type(target) is list:
            target.extend(items)
        elif type(target) is UnknownObject:
            target.items.extend(items)
        else:
            raise _Bad(f"APPEND to a {type(target).__name__}")

    def op_APPEND(self, _):
        v = self._pop()
        self._append_to(self._top(), [v])

    def op_APPENDS(self, _):
        items = self._pop_mark()
        self._append_to(self._top(), items)

    def _set_items(self, target, items):
        if len(items) % 2:
            raise _Bad("odd number of items for a dict")
        if type(target) in _DICT_TYPES:
            self.check_keys(items[::2])
            for i in range(0, len(items), 2):
                target[items[i]] = items[i + 1]
        elif type(target) is UnknownObject:
            target.dict_items.extend(zip(items[::2], items[1::2]))
        else:
            raise _Bad(f"SETITEM on a {type(target).__name__}")

    def op_EMPTY_DICT(self, _):
        self._push({})

    def op_DICT(self, _):
        d = {}
        self._set_items(d, self._pop_mark())
        self._push(d)

    def op_SETITEM(self, _):
        v = self._pop()
        k = self._pop()
        self._set_items(self._top(), [k, v])

    def op_SETITEMS(self, _):
        items = self._pop_mark()
        self._set_items(self._top(), items)

    def op_EMPTY_SET(self, _):
        self._push(set())

    def op_ADDITEMS(self, _):
        items = self._pop_mark()
        target = self._top()
        if type(target) is set:
            self.check_keys(items)
            target.update(items)
        elif type(target) is UnknownObject:
            target.items.extend(items)
        else:
            raise _Bad(f"ADDITEMS on a {type(target).__name__}")

    def op_FROZENSET(self, _):
        items = self._pop_mark()
        self.check_keys(items)
        self._push(frozenset(items))

    # -- opcodes: memo --
    def _memo_put(self, idx):
        if idx < 0 or idx > 0xFFFFFFFF:
            raise _Bad("memo index out of range")
        if idx not in self.memo and len(self.memo) >= self.limits.max_memo:
            raise _Bad(f"more than {self.limits.max_memo} memo entries")
        obj = self._top()
        self.memo[idx] = obj
        if isinstance(obj, _Pending):
            obj.memo_keys.append(idx)

    op_PUT = op_BINPUT = op_LONG_BINPUT = _memo_put

    def op_MEMOIZE(self, _):
        self._memo_put(len(self.memo))

    def _memo_get(self, idx):
        if idx not in self.memo:
            raise _Bad(f"memo entry {idx} was never stored")
        self._push(self.memo[idx])

    op_GET = op_BINGET = op_LONG_BINGET = _memo_get

    # -- opcodes: globals and object construction --
    def resolve_global(self, module, name):
        if not isinstance(module, str) or not isinstance(name, str):
            raise _Bad("STACK_GLOBAL operands are not strings")
        if self.proto < 3:
            module, name = _fix_import(module, name)
        qual = f"{module}.{name}"
        spec = self.globals.get((module, name))
        if spec is not None:
            if qual not in self.globals_seen:
                self.globals_seen.append(qual)
            return spec.value if spec.value is not None else Global(module, name)
        if self.allow_unknown_globals:
            if qual not in self.unknown_globals:
                self.unknown_globals.append(qual)
            return UnknownGlobal(module, name)
        self.fail(f"refusing global '{qual}': it is not on the allowlist of data types, so loading "
                  "could run code; nothing was executed (`wconv inspect --allow-unknown-globals` shows it "
                  "as an inert placeholder)", UnsafeFileError)

    def op_GLOBAL(self, arg):
        self._push(self.resolve_global(*arg))

    def op_STACK_GLOBAL(self, _):
        name = self._pop()
        module = self._pop()
        self._push(self.resolve_global(module, name))

    def call(self, func, args, kwargs=None, *, new=False):
        """REDUCE/NEWOBJ: run our handler for an allowlisted global (also used by handlers)."""
        if type(args) is not tuple:
            raise _Bad("call arguments are not a tuple")
        if kwargs is not None and type(kwargs) is not dict:
            raise _Bad("NEWOBJ_EX keyword arguments are not a dict")
        if type(func) is UnknownGlobal:
            return UnknownObject(func, args, kwargs)
        if type(func) is not Global:
            raise _Bad(f"cannot call a {type(func).__name__}")
        spec = self.globals[(func.module, func.name)]
        if new:
            if spec.new is None:
                raise _Bad(f"'{func}' cannot be instantiated with NEWOBJ")
            return spec.new(self, args, kwargs or {})
        if kwargs:
            raise _Bad(f"'{func}' takes no keyword arguments")
        if spec.call is None:
            raise _Bad(f"'{func}' cannot be called")
        return spec.call(self, args)

    def op_REDUCE(self, _):
        args = self._pop()
        func = self._pop()
        self._push(self.call(func, args))

    def op_NEWOBJ(self, _):
        args = self._pop()
        cls = self._pop()
        self._push(self.call(cls, args, new=True))

    def op_NEWOBJ_EX(self, _):
        kwargs = self._pop()
        args = self._pop()
        cls = self._pop()
        self._push(self.call(cls, args, kwargs, new=True))

    def op_BUILD(self, _):
        state = self._pop()
        inst = self._top()
        if type(inst) is UnknownObject:
            inst.state = state
            return
        handler = self.build_handlers.get(type(inst))
        if handler is None:
            self.fail(f"refusing BUILD (set state) on a {type(inst).__name__}: only known data types "
                      "may be built", UnsafeFileError)
        replacement = handler(self, inst, state)
        if replacement is not None:
            self.stack[-1] = replacement
            if isinstance(inst, _Pending):
                for k in inst.memo_keys:
                    if self.memo.get(k) is inst:
                        self.memo[k] = replacement

    def _refuse_instance_op(self, cls, args):
        if type(cls) is UnknownGlobal:
            return UnknownObject(cls, tuple(args))
        raise _Bad(f"INST/OBJ construction of '{cls}' is not supported")

    def op_INST(self, arg):
        cls = self.resolve_global(*arg)
        self._push(self._refuse_instance_op(cls, self._pop_mark()))

    def op_OBJ(self, _):
        items = self._pop_mark()
        if not items:
            raise _Bad("OBJ without a class")
        self._push(self._refuse_instance_op(items[0], items[1:]))

    def _ext(self, code):
        self.fail(f"refusing extension-registry opcode (code {code}): it names a global indirectly",
                  UnsafeFileError)

    op_EXT1 = op_EXT2 = op_EXT4 = _ext

    def _buffer(self, _):
        self.fail("out-of-band pickle buffers (protocol 5) are not supported", UnsupportedError)

    op_NEXT_BUFFER = op_READONLY_BUFFER = _buffer

    def op_PERSID(self, pid):
        self._persistent(pid)

    def op_BINPERSID(self, _):
        self._persistent(self._pop())

    def _persistent(self, pid):
        if self.persistent_load is None:
            raise _Bad("persistent id in a pickle that has no external storage")
        self._push(self.persistent_load(self, pid))


_DICT_TYPES = (dict, OrderedDict, Counter, Namespace)


def _fix_import(module: str, name: str) -> tuple[str, str]:
    # Protocol 0-2 pickles written by Python 2 use old module names (data tables only).
    import _compat_pickle

    if (module, name) in _compat_pickle.NAME_MAPPING:
        return _compat_pickle.NAME_MAPPING[(module, name)]
    return _compat_pickle.IMPORT_MAPPING.get(module, module), name


def _children(obj):
    t = type(obj)
    if t in (list, tuple, set, frozenset):
        return obj
    if isinstance(obj, dict) and t in _DICT_TYPES:
        kids = list(obj.keys()) + list(obj.values())
        meta = getattr(obj, "_metadata", None) if t is OrderedDict else None
        if meta is not None:
            kids.append(meta)
        return kids
    if t is UnknownObject:
        kids = [obj.cls, obj.args, obj.state, obj.items]
        if obj.kwargs:
            kids.append(obj.kwargs)
        for k, v in obj.dict_items:
            kids += (k, v)
        return kids
    return None


def check_graph(root, ctx) -> None:
    """Refuse cycles, over-deep nesting, unfinished objects and sharing bombs in a result.

    Shared references are legitimate (the memo), but a few objects referencing each other
    twice per level expand to 2**depth nodes for anyone walking the result as a tree; the
    walked size must stay proportional to the real one. Iterative, so it cannot hit the
    recursion limit; afterwards callers may walk the result recursively.
    """
    max_depth = ctx.limits.max_depth
    done: dict = {}  # id -> (height, size as a tree) of finished containers
    on_path: set = set()
    if isinstance(root, _Pending):
        ctx.fail("unfinished object (REDUCE without its BUILD)")
    kids = _children(root)
    if kids is None:
        return
    edges = 0
    # Frames are [object, child iterator, height, tree size]. Every object visited is
    # reachable from root, so ids stay unique during the walk.
    stack = [[root, iter(kids), 1, 1]]
    on_path.add(id(root))
    while stack:
        frame = stack[-1]
        for child in frame[1]:
            edges += 1
            if isinstance(child, _Pending):
                ctx.fail("unfinished object (REDUCE without its BUILD)")
            cid = id(child)
            if cid in on_path:
                ctx.fail("self-referencing container (cycle) in pickle")
            if cid in done:
                h, size = done[cid]
                if len(stack) + h > max_depth:
                    ctx.fail(f"objects nested more than {max_depth} levels deep")
                frame[2] = max(frame[2], h + 1)
                frame[3] += size
                continue
            ckids = _children(child)
            if ckids is None:
                frame[3] += 1
                continue
            if len(stack) + 1 > max_depth:
                ctx.fail(f"objects nested more than {max_depth} levels deep")
            on_path.add(cid)
            stack.append([child, iter(ckids), 1, 1])
            break
        else:
            obj, _, h, size = stack.pop()
            on_path.discard(id(obj))
            done[id(obj)] = (h, size)
            if stack:
                parent = stack[-1]
                parent[2] = max(parent[2], h + 1)
                parent[3] += size
    if done[id(root)][1] > 4 * edges + (1 << 20):
        ctx.fail("shared references expand to an enormous tree when walked (crafted pickle?)")


def loads(data, *, path=None, where: str = "pickle", allow_unknown_globals: bool = False,
          limits: Limits | None = None):
    """Unpickle plain Python/numpy data (no torch storages) safely."""
    return Unpickler(data, path=path, where=where, allow_unknown_globals=allow_unknown_globals,
                     limits=limits).load()
