"""wconv's pickle machine: one opcode interpreter, two policies, one table of globals.

Python's own Unpickler imports whatever module a pickle names and calls it; even with
`find_class` restricted, BUILD sets attributes and REDUCE calls what was resolved. This
machine only ever produces inert records: every global is a token, and REDUCE, NEWOBJ
and BUILD reach nothing but handler functions written in wconv, looked up in one table
(`pickle_globals.GLOBALS`). Where the table has no entry, or an entry is used in a way
its handler does not allow, the machine asks its policy:

- `LoadPolicy` (`unpickle`, `loads`): refuse with UnsafeFileError, before anything else
  happens; with `allow_unknown_globals`, an unknown global becomes an `UnknownGlobal`
  whose "calls" produce inert `UnknownObject` records (for inspection only).
- `ScanPolicy` (`scan`): record the reason, put a placeholder in place of the result and
  go on, never raising; bytes passed to `pickle.loads` and the like are scanned as nested
  pickles. The result (`PickleScan`) is what `wconv scan` reports.

Both run the same handlers on the same values, so they agree by construction: a pickle
scans safe exactly when loading it raises no UnsafeFileError. A handler may also refuse
its arguments (a format error: wconv cannot take them, though a real unpickler would
call the real function); the machine then goes on with a placeholder, so that a scan
still sees what follows and a load still reports anything unsafe further on (unsafe
wins over malformed) before raising that first format error.

Crafted pickles cannot exhaust memory or time: every bound is in `Limits` (opcodes, memo,
stack, MARK nesting, integer and line sizes, handler work, dict-key complexity, nesting
and sharing of the finished object graph, nested pickles), which lives with the opcode
decoder in `pickle_opcodes`.
"""
from __future__ import annotations

import re
import struct
from collections import Counter, OrderedDict
from typing import Callable

from ..errors import FormatError, UnsafeFileError, UnsupportedError, WconvError
from .pickle_globals import DICT_TYPES, GLOBALS, KEY_TYPES
from .pickle_opcodes import DEFAULT_LIMITS, OPNAMES, Limits, Malformed, Op, decode_arg, iter_opcodes
from .pickle_records import Global, GlobalSpec, Marker, Namespace, Pending, UnknownGlobal, UnknownObject

__all__ = ["DEFAULT_LIMITS", "Global", "GlobalSpec", "Limits", "LoadPolicy", "Machine", "Marker", "Namespace",
           "Op", "PickleScan", "ScanPolicy", "ScanResult", "UnknownGlobal", "UnknownObject", "iter_opcodes",
           "loads", "scan", "unpickle"]


class _Refused(Exception):
    """Internal: the policy recorded an unsafe use and wants a placeholder instead (scan)."""


# What malformed input can make Python raise inside the machine or a handler.
_DATA_ERRORS = (Malformed, ValueError, TypeError, KeyError, IndexError, AttributeError, OverflowError, UnicodeError,
                struct.error)
_MAX_SAFE_KEY_INT = (1 << 61) - 2  # ints in this range hash to themselves: no crafted collisions

# --- the machine -------------------------------------------------------------------------

_SCALAR_KEYS = (str, bytes, float, bool, type(None), complex)
_TOKEN_KEYS = (Global, UnknownGlobal, UnknownObject, Marker)
_PLAIN_NAMES = (list, set, frozenset, tuple, dict, str, bytes, bytearray, type(None))
IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")
_FAILED = object()  # a handler refused its arguments


def _fix_import(module: str, name: str) -> tuple[str, str]:
    # Protocol 0-2 pickles written by Python 2 use old module names (data tables only).
    import _compat_pickle

    if (module, name) in _compat_pickle.NAME_MAPPING:
        return _compat_pickle.NAME_MAPPING[(module, name)]
    return _compat_pickle.IMPORT_MAPPING.get(module, module), name


def _build_handlers(table) -> tuple[dict, dict]:
    """({type: BUILD handler}, {type: name of the global that makes it}) from the table."""
    handlers, makers = {}, {}
    for (module, name), spec in table.items():
        if spec.makes is not None:
            handlers[spec.makes] = spec.build
            makers.setdefault(spec.makes, f"{module}.{name}")
    return handlers, makers


_BUILD_HANDLERS, _MAKERS = _build_handlers(GLOBALS)


class Machine:
    """Interprets one pickle as data; its `policy` decides what a refusal or a failure means.

    Handlers use: `fail` (cannot take these arguments), `refuse` (unsafe), `charge` (work),
    `check_key(s)`, `call` (another global of the table), `path`, `allow_unknown_globals`.
    `persistent_load(ctx, pid)` resolves PERSID/BINPERSID (torch storages).
    """

    def __init__(self, data, policy, *, path=None, where: str = "pickle", start: int = 0, end: int | None = None,
                 persistent_load: Callable | None = None, limits: Limits | None = None):
        self.data = data
        self.policy = policy
        self.scanning = policy.scanning
        self.allow_unknown_globals = policy.allow_unknown_globals
        self.path = path
        self.where = where
        self.start = start
        self.end = len(data) if end is None else end
        self.globals = GLOBALS
        self.persistent_load = persistent_load
        self.limits = limits or DEFAULT_LIMITS
        self.key_types = _TOKEN_KEYS + KEY_TYPES
        # Types hashed in O(1) by value or by identity (frozensets cache their hash).
        self._fast_key_types = frozenset(_SCALAR_KEYS + self.key_types + (frozenset,))
        self.stack: list = []
        self.marks: list = []
        self.floor = 0  # items below the innermost MARK are invisible, as in CPython
        self.memo: dict = {}
        self.proto = 0
        self.pos = self.op_pos = start
        self.ops = 0
        self.work = 0
        self.handlers_off = False  # after the work budget is spent, every call is a placeholder
        self.failure: WconvError | None = None  # the first argument a handler refused
        self.n_failures = 0
        self.seen: dict = {}  # (module, name) -> in the table?, in order of first appearance
        self.end_pos = None  # position after STOP
        self.value = None

    # -- for handlers: errors, refusals, accounting --
    def fail(self, message: str, cls=FormatError):
        """wconv cannot take these arguments (not a safety matter)."""
        raise cls(self.path, f"{self.where}: {message}")

    def refuse(self, reason: str, message: str):
        """An unsafe use. Load: UnsafeFileError(`message`). Scan: `reason` is recorded and the
        operation is abandoned for a placeholder."""
        self.policy.refuse(self, reason, message)
        raise _Refused

    def charge(self, amount: int) -> None:
        """Account handler work (items hashed, bytes copied) against the budget."""
        self.work += amount
        budget = self.limits.work_base + self.limits.work_per_byte * (self.pos - self.start)
        if self.work > budget:
            self.handlers_off = True
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
                if depth > self.limits.max_key_depth:
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

    def call(self, func, args, kwargs=None, *, new: bool = False, op: str | None = None):
        """REDUCE/NEWOBJ (and handlers that call another global): our handler for a global of
        the table, an UnknownObject record for an unknown one; anything else is refused."""
        op = op or ("NEWOBJ" if new else "REDUCE")
        if type(args) is not tuple:
            raise Malformed("call arguments are not a tuple")
        if kwargs is not None and type(kwargs) is not dict:
            raise Malformed("NEWOBJ_EX keyword arguments are not a dict")
        t = type(func)
        if t is UnknownGlobal:
            return UnknownObject(func, args, kwargs)
        if t is not Global:
            self.refuse(f"{op} calls {self._callee(func)} rather than a named global",
                        f"refusing {op}: cannot call a {t.__name__} (only named globals of the allowlist are called)")
        spec = self.globals[(func.module, func.name)]
        handler = spec.new if new else spec.call
        if handler is None and new:
            self.refuse(f"{op} instantiates {func}, which wconv does not build that way",
                        f"refusing {op} of '{func}': wconv does not build it that way (it cannot be instantiated "
                        "with NEWOBJ)")
        if handler is None:
            self.refuse(f"{op} calls {func}, which is allowed only as a type name",
                        f"refusing to call '{func}': it cannot be called (it is allowed only as a type name)")
        result = self._handle(_FAILED, handler, args, kwargs or {}) if new else self._handle(_FAILED, handler, args)
        if result is _FAILED:
            result = UnknownObject(func, args, kwargs)
        self.policy.made(self, result, func)
        return result

    # -- internals --
    def _handle(self, placeholder, fn, *args):
        """Run one of our handlers. When it refuses its arguments, the failure is kept and
        `placeholder` stands in for the result (see the module docstring)."""
        if self.handlers_off:
            return placeholder
        try:
            return fn(self, *args)
        except _Refused:
            return placeholder
        except UnsafeFileError:
            raise
        except WconvError as e:
            self._failed(e)
        except _DATA_ERRORS as e:
            self._failed(self._error(str(e)))
        return placeholder

    def _failed(self, error: WconvError) -> None:
        if self.failure is None:
            self.failure = error
        self.n_failures += 1

    def _error(self, text: str, cls=FormatError) -> WconvError:
        op = OPNAMES.get(self.data[self.op_pos], "?") if self.op_pos < self.end else "end of data"
        return cls(self.path, f"{self.where}: bad pickle at byte {self.op_pos} ({op}): {text}")

    def _keys_ok(self, keys) -> bool:
        try:
            self.check_keys(keys)
            return True
        except FormatError as e:
            self._failed(e)
            return False

    def origin(self, obj) -> str | None:
        """The global whose call made `obj`, where known (for messages)."""
        t = type(obj)
        if t is UnknownObject:
            return str(obj.cls) if type(obj.cls) in (Global, UnknownGlobal) else "?"
        if isinstance(obj, Pending):
            return obj.origin
        return self.policy.origin(obj) or _MAKERS.get(t)

    def name_of(self, obj) -> str:
        t = type(obj)
        if t is Global or t is UnknownGlobal:
            return str(obj)
        name = self.origin(obj)
        if name:
            return name
        return t.__name__ if t in _PLAIN_NAMES else "?"

    def _callee(self, obj) -> str:
        name = self.origin(obj)
        return f"the result of {name}" if name else "a computed object"

    # -- the main loop --
    def run(self):
        """Interpret from `start` to STOP; what comes back (or is raised) is the policy's."""
        data, end, limits, stack = self.data, self.end, self.limits, self.stack
        max_ops, max_stack = limits.max_ops, limits.max_stack
        dispatch = {code: (name, getattr(self, "op_" + name)) for code, name in OPNAMES.items()}
        counts = self.policy.opcode_counts
        self.pos = self.start
        try:
            while self.end_pos is None:
                if self.pos >= end:
                    raise Malformed("truncated (no STOP opcode)")
                self.op_pos = self.pos
                entry = dispatch.get(data[self.pos])
                if entry is None:
                    raise Malformed(f"unknown opcode 0x{data[self.pos]:02x}")
                self.ops += 1
                if self.ops > max_ops:
                    raise Malformed(f"more than {max_ops} opcodes")
                if counts is not None:
                    counts[entry[0]] += 1
                arg, self.pos = decode_arg(entry[0], data, self.pos + 1, end, limits)
                entry[1](arg)
                if len(stack) > max_stack:
                    raise Malformed(f"stack exceeds {max_stack} items")
        except UnsafeFileError:
            raise
        except WconvError as e:
            return self.policy.stop(self, e)
        except RecursionError:
            return self.policy.stop(self, self._error("nested too deeply"))
        except MemoryError:
            return self.policy.stop(self, self._error("out of memory", UnsupportedError))
        except _DATA_ERRORS as e:
            return self.policy.stop(self, self._error(str(e)))
        return self.policy.finish(self, self.value)

    # -- stack helpers --
    def _push(self, obj):
        self.stack.append(obj)

    def _pop(self):
        if len(self.stack) <= self.floor:
            raise Malformed("stack underflow")
        return self.stack.pop()

    def _top(self):
        if len(self.stack) <= self.floor:
            raise Malformed("stack underflow")
        return self.stack[-1]

    def _pop_mark(self) -> list:
        if not self.marks:
            raise Malformed("MARK expected but not found")
        i = self.marks.pop()
        items = self.stack[i:]
        del self.stack[i:]
        self.floor = self.marks[-1] if self.marks else 0
        return items

    # -- opcodes: stack shuffling --
    def op_MARK(self, _):
        if len(self.marks) >= self.limits.max_marks:
            raise Malformed("MARK nested too deeply")
        self.marks.append(len(self.stack))
        self.floor = len(self.stack)

    def op_STOP(self, _):
        value = self._pop()
        if self.marks or self.stack:
            # An unpickler returns the top item regardless; wconv does not take such a pickle.
            self._failed(self._error("STOP with an unbalanced stack"))
        self.value = value
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
            raise Malformed(f"unsupported pickle protocol {v}")
        self.proto = v

    def op_FRAME(self, n):
        if n > self.end - self.pos:
            raise Malformed("FRAME runs past the end of the data")

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

    # Filling a container wconv does not model is a failure, not the end: an unpickler would
    # call the real object's method, and what follows must still be seen.
    def _append_to(self, target, items):
        if type(target) is list:
            target.extend(items)
        elif type(target) is UnknownObject:
            target.items.extend(items)
        else:
            self._failed(self._error(f"APPEND to a {type(target).__name__}"))

    def op_APPEND(self, _):
        v = self._pop()
        self._append_to(self._top(), [v])

    def op_APPENDS(self, _):
        items = self._pop_mark()
        self._append_to(self._top(), items)

    def _set_items(self, target, items):
        if len(items) % 2:
            raise Malformed("odd number of items for a dict")
        if type(target) in DICT_TYPES:
            if self._keys_ok(items[::2]):
                for i in range(0, len(items), 2):
                    target[items[i]] = items[i + 1]
        elif type(target) is UnknownObject:
            target.dict_items.extend(zip(items[::2], items[1::2]))
        else:
            self._failed(self._error(f"SETITEM on a {type(target).__name__}"))

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
            if self._keys_ok(items):
                target.update(items)
        elif type(target) is UnknownObject:
            target.items.extend(items)
        else:
            self._failed(self._error(f"ADDITEMS on a {type(target).__name__}"))

    def op_FROZENSET(self, _):
        items = self._pop_mark()
        self._push(frozenset(items) if self._keys_ok(items) else frozenset())

    # -- opcodes: memo --
    def _memo_put(self, idx):
        if idx < 0 or idx > 0xFFFFFFFF:
            raise Malformed("memo index out of range")
        if idx not in self.memo and len(self.memo) >= self.limits.max_memo:
            raise Malformed(f"more than {self.limits.max_memo} memo entries")
        obj = self._top()
        self.memo[idx] = obj
        if isinstance(obj, Pending):
            obj.memo_keys.append(idx)

    op_PUT = op_BINPUT = op_LONG_BINPUT = _memo_put

    def op_MEMOIZE(self, _):
        self._memo_put(len(self.memo))

    def _memo_get(self, idx):
        if idx not in self.memo:
            raise Malformed(f"memo entry {idx} was never stored")
        self._push(self.memo[idx])

    op_GET = op_BINGET = op_LONG_BINGET = _memo_get

    # -- opcodes: globals and object construction --
    def resolve_global(self, module, name):
        """What GLOBAL/STACK_GLOBAL/INST push: a token (or constant) from the table, else the
        policy's answer for an unknown global."""
        if type(module) is not str or type(name) is not str:
            self.seen.setdefault(("?", "?"), False)
            return self.policy.unknown_global(
                self, UnknownGlobal("?", "?"), "STACK_GLOBAL with operands that are not plain strings (global name "
                "hidden)", "refusing STACK_GLOBAL whose operands are not strings: the global it names is hidden; "
                "nothing was executed")
        if self.proto < 3:
            module, name = _fix_import(module, name)
        spec = self.globals.get((module, name))
        self.seen.setdefault((module, name), spec is not None)
        if spec is not None:
            return spec.value if spec.value is not None else Global(module, name)
        qual = f"{module}.{name}"
        calls = " and may call it" if IDENTIFIER.match(module) and IDENTIFIER.match(name) else ""
        return self.policy.unknown_global(
            self, UnknownGlobal(module, name), f"global {qual} is not an allowed data type (loading would import it"
            f"{calls})", f"refusing global '{qual}': it is not on the allowlist of data types, so loading could run "
            "code; nothing was executed (`wconv inspect --allow-unknown-globals` shows it as an inert placeholder)")

    def op_GLOBAL(self, arg):
        self._push(self.resolve_global(*arg))

    def op_STACK_GLOBAL(self, _):
        name = self._pop()
        module = self._pop()
        self._push(self.resolve_global(module, name))

    @staticmethod
    def _target(func) -> str:
        return str(func) if type(func) in (Global, UnknownGlobal) else "?"

    def _call_op(self, op, func, args, kwargs=None, new=False):
        if self.scanning:
            self.policy.count(op, self._target(func))
        try:
            return self.call(func, args, kwargs, new=new, op=op)
        except _Refused:
            return UnknownObject(func, args, kwargs)

    def op_REDUCE(self, _):
        args = self._pop()
        func = self._pop()
        if self.scanning:
            self.policy.reduce(self, func, args)
        self._push(self._call_op("REDUCE", func, args))

    def op_NEWOBJ(self, _):
        args = self._pop()
        cls = self._pop()
        self._push(self._call_op("NEWOBJ", cls, args, new=True))

    def op_NEWOBJ_EX(self, _):
        kwargs = self._pop()
        args = self._pop()
        cls = self._pop()
        self._push(self._call_op("NEWOBJ_EX", cls, args, kwargs, new=True))

    def op_BUILD(self, _):
        state = self._pop()
        inst = self._top()
        t = type(inst)
        if self.scanning:
            self.policy.count("BUILD", self.name_of(inst))
        if t is UnknownObject and not (type(inst.cls) is Global and self.globals[
                (inst.cls.module, inst.cls.name)].build is None):
            inst.state = state  # a record: unknown global, or an argument our handler refused
            return
        handler = _BUILD_HANDLERS.get(t)
        if handler is None:
            name = self.name_of(inst)
            what = f"the result of '{name}'" if t is UnknownObject else f"a {t.__name__}"
            try:
                self.refuse(f"BUILD sets the state of {'an object of unknown origin' if name == '?' else name} "
                            "(it could set any attribute)",
                            f"refusing BUILD (set state) on {what}: only known data types may be built")
            except _Refused:
                return
        replacement = self._handle(None, handler, inst, state)
        if replacement is not None:
            self.stack[-1] = replacement
            if isinstance(inst, Pending):
                for k in inst.memo_keys:
                    if self.memo.get(k) is inst:
                        self.memo[k] = replacement

    def _instantiate(self, op, cls, args):
        # INST/OBJ: class(*args) in a real unpickler; wconv builds nothing this way.
        named = type(cls) in (Global, UnknownGlobal)
        if self.scanning:
            self.policy.count(op, self._target(cls))
        what = str(cls) if named else "a computed object"
        reason = f"{op} instantiates {what}"
        if type(cls) is UnknownGlobal:
            self.policy.flag(self, reason)
        else:
            try:
                self.refuse(reason, f"refusing INST/OBJ construction of {repr(what) if named else what}: wconv does "
                                    "not build objects that way")
            except _Refused:
                pass
        self._push(UnknownObject(cls, tuple(args)))

    def op_INST(self, arg):
        cls = self.resolve_global(*arg)
        self._instantiate("INST", cls, self._pop_mark())

    def op_OBJ(self, _):
        items = self._pop_mark()
        if not items:
            raise Malformed("OBJ without a class")
        self._instantiate("OBJ", items[0], items[1:])

    def _ext(self, code):
        self.policy.ext(code)
        try:
            self.refuse(f"extension code {code} (EXT opcode: names a global indirectly, through copyreg's registry)",
                        f"refusing extension-registry opcode (code {code}): it names a global indirectly")
        except _Refused:
            self._push(UnknownGlobal("?", f"extension code {code}"))

    op_EXT1 = op_EXT2 = op_EXT4 = _ext

    def _buffer(self, push: bool):
        self.policy.buffer()
        try:
            self.refuse("protocol-5 out-of-band buffer (data supplied from outside the file)",
                        "refusing out-of-band pickle buffers (protocol 5): their data would come from outside the file")
        except _Refused:
            if push:
                self._push(UnknownObject("out-of-band buffer"))

    def op_NEXT_BUFFER(self, _):
        self._buffer(True)

    def op_READONLY_BUFFER(self, _):
        self._buffer(False)

    def op_PERSID(self, pid):
        self._persistent(pid)

    def op_BINPERSID(self, _):
        self._persistent(self._pop())

    def _persistent(self, pid):
        self.policy.persistent_id()
        placeholder = UnknownObject("persistent id", (pid,))
        if self.persistent_load is None:
            self._failed(self._error("persistent id in a pickle that has no external storage"))
            self._push(placeholder)
        else:
            self._push(self._handle(placeholder, self.persistent_load, pid))


# --- the finished object graph ------------------------------------------------------------


def _children(obj):
    t = type(obj)
    if t in (list, tuple, set, frozenset):
        return obj
    if isinstance(obj, dict) and t in DICT_TYPES:
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
    if isinstance(root, Pending):
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
            if isinstance(child, Pending):
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
    if done[id(root)][1] > ctx.limits.tree_factor * edges + ctx.limits.tree_slack:
        ctx.fail("shared references expand to an enormous tree when walked (crafted pickle?)")


# --- the two policies --------------------------------------------------------------------


class _Policy:
    scanning = False
    allow_unknown_globals = False
    opcode_counts = None  # a Counter to count opcodes into, or None

    # What scanning records; loading needs none of it.
    def flag(self, vm, reason):
        pass

    def count(self, op, target):
        pass

    def made(self, vm, result, func):
        pass

    def origin(self, obj):
        return None

    def reduce(self, vm, func, args):
        pass

    def ext(self, code):
        pass

    def buffer(self):
        pass

    def persistent_id(self):
        pass


class LoadPolicy(_Policy):
    """Refuse anything unsafe at once; a refused argument is raised when the pickle ends."""

    def __init__(self, allow_unknown_globals: bool = False):
        self.allow_unknown_globals = allow_unknown_globals

    def unknown_global(self, vm, token, reason, message):
        if self.allow_unknown_globals:
            return token
        raise UnsafeFileError(vm.path, f"{vm.where}: {message}")

    def refuse(self, vm, reason, message):
        raise UnsafeFileError(vm.path, f"{vm.where}: {message}")

    def stop(self, vm, error):
        raise vm.failure or error

    def finish(self, vm, value):
        if vm.failure is not None:
            raise vm.failure
        check_graph(value, vm)
        return value


# Calls that unpickle bytes: their argument is scanned as a nested pickle.
_PICKLE_LOADERS = {("pickle", "loads"), ("_pickle", "loads"), ("cPickle", "loads"), ("pickle", "_loads"),
                   ("dill", "loads"), ("cloudpickle", "loads"), ("joblib", "load")}
_UNNAMED = (type(None), bool, int, float, complex, str, bytes)  # shared values: not named by origin


class PickleScan:
    """What one pickle would do (the scan policy's record). `safe`: no reasons."""

    def __init__(self, label: str):
        self.label = label
        self.protocol = 0
        self.n_opcodes = 0
        self.opcodes: Counter = Counter()
        self.end = None  # position after STOP
        self.globals: list = []  # (module, name) in order of appearance; ("?", "?") for a hidden one
        self.unknown: list = []  # "module.name" outside the table
        self.calls: dict = {}  # opcode -> Counter(target)
        self.ext: list = []
        self.buffers = 0
        self.persistent_ids = 0
        self.reasons: list = []
        self.nested: list = []
        self.error = None  # why decoding stopped before STOP
        self.failures = 0  # arguments wconv's handlers refused (not unsafe: loading fails, nothing runs)
        self.value = None  # the result, placeholders included
        self.max_listed = DEFAULT_LIMITS.max_listed

    @property
    def safe(self) -> bool:
        return not self.reasons

    def reason(self, text: str):
        if len(self.reasons) < self.max_listed and text not in self.reasons:
            self.reasons.append(text)

    def as_dict(self) -> dict:
        n = self.max_listed
        out = {"name": self.label, "protocol": self.protocol, "n_opcodes": self.n_opcodes, "safe": self.safe,
               "globals": [f"{m}.{q}" for m, q in self.globals if m != "?"][:n],
               "unknown_globals": self.unknown[:n],
               "calls": {op: dict(c.most_common(n)) for op, c in self.calls.items()},
               "extension_codes": self.ext[:n], "out_of_band_buffers": self.buffers,
               "persistent_ids": self.persistent_ids, "reasons": self.reasons}
        if self.error:
            out["error"] = self.error
        if self.nested:
            out["nested"] = [p.as_dict() for p in self.nested]
        return out


ScanResult = PickleScan  # the name scan_torch_file's callers know


class ScanPolicy(_Policy):
    """Record every unsafe use as a reason and go on with placeholders; never raise."""

    scanning = True

    def __init__(self, record: PickleScan, limits: Limits, depth: int = 0):
        self.record = record
        self.limits = limits
        self.depth = depth
        self.opcode_counts = record.opcodes
        self._named: dict = {}  # id -> (result, name of the global that made it)

    def unknown_global(self, vm, token, reason, message):
        self.record.reason(reason)
        return token

    def refuse(self, vm, reason, message):
        self.record.reason(reason)

    def flag(self, vm, reason):
        self.record.reason(reason)

    def stop(self, vm, error):
        self.record.error = error.message[len(vm.where) + 2:] if error.message.startswith(vm.where + ": ") \
            else error.message

    def finish(self, vm, value):
        return value

    def count(self, op, target):
        self.record.calls.setdefault(op, Counter())[target] += 1

    def made(self, vm, result, func):
        if type(result) in _UNNAMED or (type(result) is tuple and not result):
            return
        if len(self._named) < self.limits.max_named_results:
            self._named[id(result)] = (result, str(func))

    def origin(self, obj):
        entry = self._named.get(id(obj))
        return entry[1] if entry is not None and entry[0] is obj else None

    def reduce(self, vm, func, args):
        if not (type(func) is UnknownGlobal and (func.module, func.name) in _PICKLE_LOADERS):
            return
        if type(args) is not tuple or not args or type(args[0]) not in (bytes, bytearray):
            return
        if self.depth >= self.limits.nested_depth:
            self.record.reason("pickles nested too deeply to scan")
            return
        inner = scan(bytes(args[0]), label=f"{self.record.label} > {func} argument", limits=self.limits,
                     depth=self.depth + 1)
        if len(self.record.nested) < self.limits.max_nested_listed:
            self.record.nested.append(inner)
        for r in inner.reasons:
            self.record.reason(f"nested pickle: {r}")

    def ext(self, code):
        if len(self.record.ext) < self.limits.max_listed:
            self.record.ext.append(code)

    def buffer(self):
        self.record.buffers += 1

    def persistent_id(self):
        self.record.persistent_ids += 1


# --- entry points -------------------------------------------------------------------------


def unpickle(data, *, path=None, where: str = "pickle", start: int = 0, persistent_load: Callable | None = None,
             allow_unknown_globals: bool = False, limits: Limits | None = None) -> Machine:
    """Load one pickle under the load policy. The machine comes back finished: `value`,
    `proto`, `end_pos`, `seen` (globals). Raises WconvError (UnsafeFileError if unsafe)."""
    vm = Machine(data, LoadPolicy(allow_unknown_globals), path=path, where=where, start=start,
                 persistent_load=persistent_load, limits=limits)
    vm.run()
    return vm


def loads(data, *, path=None, where: str = "pickle", allow_unknown_globals: bool = False,
          limits: Limits | None = None):
    """Unpickle plain data (no torch storages) safely."""
    return unpickle(data, path=path, where=where, allow_unknown_globals=allow_unknown_globals, limits=limits).value


def scan(data, start: int = 0, *, path=None, label: str = "pickle", persistent_load: Callable | None = None,
         limits: Limits | None = None, depth: int = 0) -> PickleScan:
    """Run one pickle under the scan policy: what it would import and call. Never raises."""
    limits = limits or DEFAULT_LIMITS
    rec = PickleScan(label)
    rec.max_listed = limits.max_listed
    vm = Machine(data, ScanPolicy(rec, limits, depth), path=path, where=label, start=start,
                 persistent_load=persistent_load, limits=limits)
    rec.value = vm.run()
    rec.protocol = vm.proto
    rec.n_opcodes = vm.ops
    rec.end = vm.end_pos
    rec.failures = vm.n_failures
    rec.globals = list(vm.seen)
    rec.unknown = [f"{m}.{n}" for (m, n), known in vm.seen.items() if not known and m != "?"]
    return rec
