"""`wconv scan`: what loading a file with pickle/torch.load would call, found without running it.

Every pickle in the file is decoded opcode by opcode and executed *symbolically*: the
stack holds only inert descriptions (strings, global names, "result of calling X"),
which is enough to tell which global each REDUCE/NEWOBJ/BUILD acts on. Nothing is
imported or called. The verdict is "safe" when the pickles only use wconv's allowlist
of data globals (plain containers, numpy scalars/arrays, torch tensor rebuilding) in
the ways wconv's own restricted reader accepts; anything else is "unsafe", with reasons
that name the global or opcode. Files that are not pickle-based (safetensors, GGUF,
GGML, llama2.c) hold nothing executable; they are still checked for being a pickle
prefix in disguise, since torch.load would unpickle any file that is not a zip.

scan_path(path) -> dict (the `--json` output); format_scan(dict) -> text.
"""
from __future__ import annotations

import os
import pickletools
import re
import struct
from collections import Counter

from ..errors import FormatError, WconvError
from ..formats import pickle_vm
from ..formats.pickle_vm import DEFAULT_LIMITS

SCAN_VERSION = 1
PICKLE_EXTENSIONS = (".bin", ".pth", ".pt", ".pkl", ".pickle", ".ckpt")
WEIGHT_EXTENSIONS = (".safetensors", ".gguf", ".ggml", ".ggjt")
MAX_LISTED = 200  # globals / reasons kept per pickle (the JSON stays bounded)
MAX_NESTED_DEPTH = 3
MAX_NESTED_LISTED = 20
MAX_TOKENIZER_BYTES = 64 << 20  # unknown files larger than this are not tried as tokenizers
_MAX_FILES = 10_000
LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")

# Results of these calls may receive BUILD: wconv's reader has a state handler for each.
_BUILDABLE = {"collections.OrderedDict", "argparse.Namespace", "numpy.dtype",
              "numpy.core.multiarray._reconstruct", "numpy._core.multiarray._reconstruct"}
# Calls that unpickle bytes: their argument is scanned as a nested pickle.
_PICKLE_LOADERS = {("pickle", "loads"), ("_pickle", "loads"), ("cPickle", "loads"), ("pickle", "_loads"),
                   ("dill", "loads"), ("cloudpickle", "loads"), ("joblib", "load")}


def _allowlist() -> dict:
    from ..formats.torch_file import TORCH_GLOBALS

    return TORCH_GLOBALS


# --- symbolic values -----------------------------------------------------------------------


class _Global:
    __slots__ = ("module", "name")

    def __init__(self, module, name):
        self.module, self.name = module, name

    def __str__(self):
        return f"{self.module}.{self.name}"


class _Result:
    """What a REDUCE/NEWOBJ/INST/OBJ would have returned: only its origin is known."""

    __slots__ = ("origin",)

    def __init__(self, origin: str):
        self.origin = origin


class _Dict:
    __slots__ = ("keys",)

    def __init__(self, keys=()):
        self.keys = [k for k in keys if isinstance(k, str)]


class _Tuple:
    __slots__ = ("items",)

    def __init__(self, items):
        self.items = tuple(items)


class _Ext:
    """The global an EXT opcode names through copyreg's extension registry (unknowable here)."""

    __slots__ = ("code",)

    def __init__(self, code):
        self.code = code


class _Plain:
    """A list or set (BUILD on one sets attributes on a builtin: never legitimate)."""

    __slots__ = ("kind",)

    def __init__(self, kind):
        self.kind = kind


_OTHER = object()
_STRINGS = {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE"}
_STR8 = {"STRING", "BINSTRING", "SHORT_BINSTRING"}
_BYTES = {"BINBYTES", "SHORT_BINBYTES", "BINBYTES8", "BYTEARRAY8"}


def _effects() -> dict:
    # Stack effect of every opcode, from the stdlib's opcode table (data only).
    out = {}
    for od in pickletools.opcodes:
        before = od.stack_before
        pops = len([b for b in before if b not in (pickletools.markobject, pickletools.stackslice)])
        out[od.name] = (pickletools.markobject in before, pops, len(od.stack_after))
    return out


_EFFECTS = _effects()


class _PickleScan:
    """Symbolic execution of one pickle; collects globals, calls and reasons for concern."""

    def __init__(self, label: str, allow: dict, *, depth: int = 0):
        self.label = label
        self.allow = allow
        self.depth = depth
        self.proto = 0
        self.n_ops = 0
        self.end = None
        self.globals: list = []  # "module.name", first appearance
        self.unknown: list = []
        self.calls: dict = {}  # opcode -> Counter(target)
        self.ext: list = []
        self.buffers = 0
        self.persistent_ids = 0
        self.reasons: list = []
        self.nested: list = []
        self.error = None
        self.stack: list = []
        self.marks: list = []
        self.memo: dict = {}

    # -- bookkeeping --
    def reason(self, text: str):
        if len(self.reasons) < MAX_LISTED and text not in self.reasons:
            self.reasons.append(text)

    def _count(self, op: str, target: str):
        self.calls.setdefault(op, Counter())[target] += 1

    def _resolve(self, module, name):
        if self.proto < 3:  # Python 2 module names, as the unpickler maps them
            return pickle_vm._fix_import(module, name)
        return module, name

    def _global(self, module, name) -> _Global:
        module, name = self._resolve(module, name)
        g = _Global(module, name)
        qual = str(g)
        if qual not in self.globals:
            if len(self.globals) < MAX_LISTED:
                self.globals.append(qual)
            if (module, name) not in self.allow:
                if len(self.unknown) < MAX_LISTED:
                    self.unknown.append(qual)
                self.reason(f"global {qual} is not an allowed data type (loading would import it"
                            + (" and may call it)" if _IDENT.match(module) and _IDENT.match(name) else ")"))
        return g

    def _spec(self, g):
        return self.allow.get((g.module, g.name)) if isinstance(g, _Global) else None

    # -- stack --
    def push(self, v):
        self.stack.append(v)
        if len(self.stack) > DEFAULT_LIMITS.max_stack:
            raise FormatError(None, "pickle stack exceeds its limit")

    def pop(self):
        if self.marks and len(self.stack) <= self.marks[-1]:
            return _OTHER
        return self.stack.pop() if self.stack else _OTHER

    def top(self):
        return self.stack[-1] if self.stack else _OTHER

    def pop_mark(self) -> list:
        at = self.marks.pop() if self.marks else 0
        items = self.stack[at:]
        del self.stack[at:]
        return items

    # -- opcodes of concern --
    def call(self, op: str, func, args):
        if isinstance(func, _Global):
            target = str(func)
            self._count(op, target)
            spec = self._spec(func)
            if spec is None:
                return _Result(target)  # already reported as a global
            if op == "REDUCE" and spec.call is None:
                self.reason(f"REDUCE calls {target}, which is allowed only as a type name")
            if op != "REDUCE" and spec.new is None:
                self.reason(f"{op} instantiates {target}, which wconv does not build that way")
            if (func.module, func.name) == ("copyreg", "_reconstructor"):
                return self._reconstructor(args)
            return _Result(target)
        if isinstance(func, _Result):
            where = f"the result of {func.origin}"
        elif isinstance(func, _Ext):
            where = f"the global behind extension code {func.code}"
        else:
            where = "a computed object"
        self._count(op, "?")
        self.reason(f"{op} calls {where} rather than a named global")
        return _Result("?")

    def _reconstructor(self, args):
        # copyreg._reconstructor(cls, object, None) is protocol 0/1's cls.__new__(cls).
        if (isinstance(args, _Tuple) and len(args.items) == 3 and isinstance(args.items[0], _Global)
                and isinstance(args.items[1], _Global) and str(args.items[1]) == "builtins.object"
                and args.items[2] is None):
            cls = args.items[0]
            spec = self._spec(cls)
            if spec is not None and spec.new is None:
                self.reason(f"copyreg._reconstructor instantiates {cls}, which wconv does not build that way")
            return _Result(str(cls))
        self.reason("copyreg._reconstructor with arguments other than (class, object, None)")
        return _Result("?")

    def build(self, inst, state):
        if isinstance(inst, _Result):
            target = inst.origin
        elif isinstance(inst, _Plain):
            target = inst.kind
        elif isinstance(inst, (_Tuple, _Dict, str, bytes, bytearray)) or inst is None:
            target = {_Tuple: "tuple", _Dict: "dict"}.get(type(inst), type(inst).__name__)
        else:
            target = "?"
        self._count("BUILD", target)
        if target not in _BUILDABLE:
            self.reason(f"BUILD sets the state of {'an object of unknown origin' if target == '?' else target}"
                        " (it could set any attribute)")
            return
        if isinstance(state, _Tuple) and len(state.items) == 2 and state.items[1] is not None:
            self.reason(f"BUILD on {target} with slot state (setattr of arbitrary attributes)")
            state = state.items[0]
        if isinstance(state, _Dict):
            dunder = [k for k in state.keys if k.startswith("__")]
            if dunder:
                self.reason(f"BUILD on {target} sets attribute {dunder[0]}")

    def nested_pickle(self, func, args):
        if not (isinstance(func, _Global) and (func.module, func.name) in _PICKLE_LOADERS):
            return
        if not isinstance(args, _Tuple) or not args.items or not isinstance(args.items[0], (bytes, bytearray)):
            return
        if self.depth >= MAX_NESTED_DEPTH:
            self.reason("pickles nested too deeply to scan")
            return
        inner = _PickleScan(f"{self.label} > {func} argument", self.allow, depth=self.depth + 1)
        inner.run(bytes(args.items[0]), 0, path=None)
        if len(self.nested) < MAX_NESTED_LISTED:
            self.nested.append(inner)
        for r in inner.reasons:
            self.reason(f"nested pickle: {r}")

    # -- main loop --
    def run(self, data, start: int, *, path):
        """Decode from `start` to STOP. A malformed pickle is recorded in `error`, not raised,
        so that what an unpickler would already have done before failing is still reported."""
        try:
            for op in pickle_vm.iter_opcodes(data, start, path=path):
                self.n_ops += 1
                self.step(op)
                if op.name == "STOP":
                    self.end = op.pos + 1
                    break
        except WconvError as e:
            self.error = e.message
        return self

    def step(self, op):
        handler = self._dispatch.get(op.name)
        if handler is not None:
            handler(self, op.arg)
            return
        mark, pops, pushes = _EFFECTS[op.name]
        if mark:
            self.pop_mark()
        for _ in range(pops):
            self.pop()
        for _ in range(pushes):
            self.push(_OTHER)

    # -- opcode handlers (the rest only move things on the stack: see _EFFECTS) --
    def _proto(self, arg):
        self.proto = arg

    def _nothing(self, arg):
        pass

    def _mark(self, arg):
        if len(self.marks) >= DEFAULT_LIMITS.max_marks:
            raise FormatError(None, "MARK nested too deeply")
        self.marks.append(len(self.stack))

    def _pop_op(self, arg):
        if self.marks and len(self.stack) == self.marks[-1]:
            self.marks.pop()  # CPython: POP on an empty frame discards the mark
        else:
            self.pop()

    def _pop_mark_op(self, arg):
        self.pop_mark()

    def _dup(self, arg):
        self.push(self.top())

    def _push_arg(self, arg):
        self.push(arg)

    def _push_str8(self, arg):
        self.push(arg.decode("latin-1"))

    def _none(self, arg):
        self.push(None)

    def _global_op(self, arg):
        self.push(self._global(*arg))

    def _stack_global(self, arg):
        qual, module = self.pop(), self.pop()
        if isinstance(module, str) and isinstance(qual, str):
            self.push(self._global(module, qual))
        else:
            self.reason("STACK_GLOBAL with operands that are not plain strings (global name hidden)")
            self.push(_OTHER)

    def _inst(self, arg):
        g = self._global(*arg)
        self.pop_mark()
        self._count("INST", str(g))
        self.reason(f"INST instantiates {g}")
        self.push(_Result(str(g)))

    def _obj(self, arg):
        items = self.pop_mark()
        cls = items[0] if items else _OTHER
        label = str(cls) if isinstance(cls, _Global) else "?"
        self._count("OBJ", label)
        self.reason(f"OBJ instantiates {cls if isinstance(cls, _Global) else 'a computed object'}")
        self.push(_Result(label))

    def _reduce(self, arg):
        args, func = self.pop(), self.pop()
        self.nested_pickle(func, args)
        self.push(self.call("REDUCE", func, args))

    def _newobj(self, arg):
        args, cls = self.pop(), self.pop()
        self.push(self.call("NEWOBJ", cls, args))

    def _newobj_ex(self, arg):
        _, args, cls = self.pop(), self.pop(), self.pop()
        self.push(self.call("NEWOBJ_EX", cls, args))

    def _build_op(self, arg):
        state = self.pop()
        self.build(self.top(), state)

    def _ext(self, arg):
        if len(self.ext) < MAX_LISTED:
            self.ext.append(arg)
        self.reason(f"extension code {arg} (EXT opcode: names a global indirectly, through copyreg's registry)")
        self.push(_Ext(arg))

    def _next_buffer(self, arg):
        self.buffers += 1
        self.reason("protocol-5 out-of-band buffer (data supplied from outside the file)")
        self.push(_OTHER)

    def _readonly_buffer(self, arg):
        self.buffers += 1
        self.reason("protocol-5 out-of-band buffer (data supplied from outside the file)")

    def _persid(self, arg):
        self.persistent_ids += 1
        self.push(_OTHER)

    def _binpersid(self, arg):
        self.persistent_ids += 1
        self.pop()
        self.push(_OTHER)

    def _put(self, arg):
        if len(self.memo) >= DEFAULT_LIMITS.max_memo and arg not in self.memo:
            raise FormatError(None, "too many memo entries")
        self.memo[arg] = self.top()

    def _memoize(self, arg):
        self._put(len(self.memo))

    def _get(self, arg):
        self.push(self.memo.get(arg, _OTHER))

    def _empty_dict(self, arg):
        self.push(_Dict())

    def _dict(self, arg):
        self.push(_Dict(self.pop_mark()[::2]))

    def _setitem(self, arg):
        self.pop()
        self._add_keys([self.pop()])

    def _setitems(self, arg):
        self._add_keys(self.pop_mark()[::2])

    def _add_keys(self, keys):
        target = self.top()
        if isinstance(target, _Dict) and len(target.keys) < MAX_LISTED:
            target.keys += [k for k in keys if isinstance(k, str)][:MAX_LISTED]

    def _empty_tuple(self, arg):
        self.push(_Tuple(()))

    def _tuple(self, arg):
        self.push(_Tuple(self.pop_mark()))

    def _tuple_n(n):
        def handler(self, arg):
            items = [self.pop() for _ in range(n)]
            self.push(_Tuple(items[::-1]))

        return handler

    def _plain(kind):
        def handler(self, arg):
            self.push(_Plain(kind))

        return handler

    def _list(self, arg):
        self.pop_mark()
        self.push(_Plain("list"))

    def _frozenset(self, arg):
        self.pop_mark()
        self.push(_Plain("frozenset"))

    _dispatch = {
        "PROTO": _proto, "STOP": _nothing, "FRAME": _nothing, "MARK": _mark, "POP": _pop_op,
        "POP_MARK": _pop_mark_op, "DUP": _dup, "NONE": _none, "GLOBAL": _global_op,
        "STACK_GLOBAL": _stack_global, "INST": _inst, "OBJ": _obj, "REDUCE": _reduce, "NEWOBJ": _newobj,
        "NEWOBJ_EX": _newobj_ex, "BUILD": _build_op, "EXT1": _ext, "EXT2": _ext, "EXT4": _ext,
        "NEXT_BUFFER": _next_buffer, "READONLY_BUFFER": _readonly_buffer, "PERSID": _persid,
        "BINPERSID": _binpersid, "PUT": _put, "BINPUT": _put, "LONG_BINPUT": _put, "MEMOIZE": _memoize,
        "GET": _get, "BINGET": _get, "LONG_BINGET": _get, "EMPTY_DICT": _empty_dict, "DICT": _dict,
        "SETITEM": _setitem, "SETITEMS": _setitems, "EMPTY_TUPLE": _empty_tuple, "TUPLE": _tuple,
        "TUPLE1": _tuple_n(1), "TUPLE2": _tuple_n(2), "TUPLE3": _tuple_n(3),
        "EMPTY_LIST": _plain("list"), "LIST": _list, "EMPTY_SET": _plain("set"), "FROZENSET": _frozenset,
    }
    _dispatch.update(dict.fromkeys(_STRINGS | _BYTES, _push_arg))
    _dispatch.update(dict.fromkeys(_STR8, _push_str8))
    del _tuple_n, _plain

    def as_dict(self) -> dict:
        out = {"name": self.label, "protocol": self.proto, "n_opcodes": self.n_ops,
               "safe": not self.reasons, "globals": self.globals, "unknown_globals": self.unknown,
               "calls": {op: dict(c.most_common(MAX_LISTED)) for op, c in self.calls.items()},
               "extension_codes": self.ext[:MAX_LISTED], "out_of_band_buffers": self.buffers,
               "persistent_ids": self.persistent_ids, "reasons": self.reasons}
        if self.error:
            out["error"] = self.error
        if self.nested:
            out["nested"] = [n.as_dict() for n in self.nested]
        return out


# --- files -------------------------------------------------------------------------------


def _scan_one(data, start, label, path, allow) -> _PickleScan:
    return _PickleScan(label, allow).run(data, start, path=path)


def _literal_int(data, start) -> int | None:
    """The value of a pickle that is just one integer (the legacy magic number), else None."""
    value = None
    try:
        for op in pickle_vm.iter_opcodes(data, start):
            if op.name in ("PROTO", "FRAME", "STOP"):
                continue
            if op.name not in ("INT", "BININT", "BININT1", "BININT2", "LONG", "LONG1", "LONG4") or value is not None:
                return None
            value = op.arg
    except WconvError:
        return None
    return value


def _known_non_pickle(path: str, head: bytes, size: int) -> str | None:
    from ..sniff import GGML_MAGICS, GGUF_MAGIC, LLAMA2C_MAGIC

    if head.startswith(GGUF_MAGIC):
        return "gguf"
    if head[:4] in GGML_MAGICS:
        return GGML_MAGICS[head[:4]]
    if head[:4] == LLAMA2C_MAGIC[::-1]:
        return "llama2c"
    if len(head) >= 9 and head[8:9] == b"{" and 8 + struct.unpack_from("<Q", head)[0] <= size:
        return "safetensors"
    from ..formats.llama2c import looks_like_v0

    if looks_like_v0(path):
        return "llama2c-v0"
    return None


def _known_tokenizer(path: str) -> str | None:
    if os.path.getsize(path) > MAX_TOKENIZER_BYTES:  # these readers load the whole file
        return None
    for module, fmt in (("llama2c_tokenizer", "llama2c-tokenizer"), ("sentencepiece", "sentencepiece")):
        try:
            mod = __import__(f"wconv.formats.{module}", fromlist=["read"])
            if mod.read(path).tokens:
                return fmt
        except WconvError:
            continue
    return None


def _file_result(path, fmt, pickles, reasons, notes) -> dict:
    return {"path": path, "format": fmt, "safe": not reasons, "verdict": "unsafe" if reasons else "safe",
            "reasons": reasons[:MAX_LISTED], "notes": notes, "pickles": [p.as_dict() for p in pickles]}


def _collect(pickles) -> list:
    reasons = []
    for p in pickles:
        for r in p.reasons:
            reasons.append(f"{p.label}: {r}")
    return reasons


def scan_file(path: str) -> dict:
    """Scan one file. Raises WconvError when it cannot be read or decoded at all."""
    from ..formats.torch_zip import MappedFile, ZipArchive

    allow = _allowlist()
    mf = MappedFile(path)
    head = mf.read(0, min(16, mf.size))
    try:
        if head[:4] in (b"PK\x03\x04", b"PK\x05\x06"):
            return _scan_zip(path, ZipArchive(mf), allow)
        return _scan_stream(path, mf, head, allow)
    except WconvError as e:
        if e.path is None:
            e = FormatError(path, e.message)
        raise e from None
    except (ValueError, TypeError, KeyError, IndexError, OverflowError, struct.error, UnicodeError) as e:
        raise FormatError(path, f"cannot scan: {type(e).__name__}: {e}") from None


def _scan_zip(path, zf, allow) -> dict:
    from ..formats.torch_file import MAX_PICKLE_BYTES

    pickles, notes = [], []
    for name, m in zf.members.items():
        if name.endswith(".pkl"):
            p = _scan_one(zf.read(m, MAX_PICKLE_BYTES), 0, name, path, allow)
            if p.error and not (p.reasons and _executable_prefix(p)):
                raise FormatError(path, f"{name}: {p.error}")
            if p.error:  # torch.load would act on the opcodes before the malformed part
                notes.append(f"{name} is not a complete pickle ({p.error}); an unpickler would act on the "
                             "opcodes before the error")
            pickles.append(p)
    reasons = _collect(pickles)
    code = [n for n in zf.members if "/code/" in n or n.startswith("code/")]
    if code:
        reasons.append(f"TorchScript archive: {len(code)} code members are compiled and run by torch.jit.load")
    if not pickles:
        notes.append("zip archive without pickles: nothing torch.load would unpickle")
    return _file_result(path, "torch-zip", pickles, reasons, notes)


def _scan_stream(path, mf, head, allow) -> dict:
    from ..formats.torch_file import LEGACY_PICKLES

    view = mf.view(0, mf.size)
    first = _scan_one(view, 0, "pickle 0", path, allow)
    known = _known_non_pickle(path, head, mf.size)
    if first.error is not None:
        tokenizer = None if known else _known_tokenizer(path)
        if first.reasons and _executable_prefix(first):
            # pickle.load would run these opcodes before reaching the malformed part.
            first.label = "pickle prefix"
            reasons = _collect([first])
            return _file_result(path, known or tokenizer or "pickle (malformed)", [first], reasons,
                                [f"not a complete pickle ({first.error}); an unpickler would act on the "
                                 "opcodes before the error"])
        if known or tokenizer:
            return _file_result(path, known or tokenizer, [], [], ["no pickle; nothing executable"])
        raise FormatError(path, f"neither a pickle-based file nor a known weight format ({first.error})")
    if known:  # a complete pickle that also parses as another format: report the pickle
        first.label = "pickle prefix"
        return _file_result(path, known, [first], _collect([first]),
                            ["the file is also a complete pickle (a polyglot): torch.load would unpickle it"])
    pickles, notes = [first], []
    legacy = _literal_int(view, 0) == LEGACY_MAGIC
    if legacy:
        first.label = LEGACY_PICKLES[0]
    pos = first.end
    labels = iter(LEGACY_PICKLES[1:]) if legacy else (f"pickle {i}" for i in range(1, 1 << 30))
    for label in labels:
        if pos >= mf.size:
            break
        p = _scan_one(view, pos, label, path, allow)
        if p.error is not None:
            if legacy:
                raise FormatError(path, f"legacy torch file: {label} pickle: {p.error}")
            if p.reasons and _executable_prefix(p):
                pickles.append(p)
            notes.append(f"{mf.size - pos} bytes after pickle {len(pickles) - 1} are not a pickle "
                         "(pickle.load reads only the first one)")
            break
        pickles.append(p)
        pos = p.end
    if legacy and len(pickles) < len(LEGACY_PICKLES):
        notes.append("legacy torch file ends before all of its pickles: truncated")
    if not legacy and len(pickles) > 1:
        notes.append(f"{len(pickles)} pickles back to back; pickle.load reads only the first")
    fmt = "torch-legacy" if legacy else "pickle"
    if not legacy and any(p.persistent_ids for p in pickles):
        notes.append("persistent ids without a torch container: pickle.load would fail on them")
    return _file_result(path, fmt, pickles, _collect(pickles), notes)


def _executable_prefix(p: _PickleScan) -> bool:
    # A malformed prefix matters only if it names importable globals or uses opcodes that call.
    return any(_IDENT.match(g.rsplit(".", 1)[0]) for g in p.unknown) or bool(
        set(p.calls) & {"INST", "OBJ"}) or bool(p.ext)


def _candidates(directory: str) -> list:
    out = []
    for root, dirs, files in os.walk(directory):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for f in sorted(files):
            if f.lower().endswith(PICKLE_EXTENSIONS + WEIGHT_EXTENSIONS):
                out.append(os.path.join(root, f))
                if len(out) > _MAX_FILES:
                    raise FormatError(directory, f"more than {_MAX_FILES} files to scan")
    return out


def scan_path(path) -> dict:
    """Scan a file, or every weight/pickle file under a directory. JSON-serialisable result.

    `safe` is True only if nothing scanned is unsafe or unreadable. `verdict` is "safe",
    "unsafe" (reasons name the globals/opcodes) or "unreadable" (some file could not be
    decoded; no file unsafe). A single unreadable file raises WconvError instead.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FormatError(path, "no such file or directory")
    if not os.path.isdir(path):
        files = [scan_file(path)]
    else:
        files = []
        for p in _candidates(path):
            try:
                files.append(scan_file(p))
            except WconvError as e:
                files.append({"path": p, "format": "unknown", "safe": False, "verdict": "unreadable",
                              "reasons": [], "notes": [], "pickles": [], "error": str(e)})
    reasons = [f"{os.path.relpath(f['path'], path) if os.path.isdir(path) else os.path.basename(f['path'])}: {r}"
               for f in files for r in f["reasons"]][:MAX_LISTED]
    unreadable = [f["path"] for f in files if f["verdict"] == "unreadable"]
    verdict = "unsafe" if reasons else "unreadable" if unreadable else "safe"
    notes = []
    if os.path.isdir(path) and not files:
        notes.append("no pickle or weight files found")
    if all(not f["pickles"] for f in files) and verdict == "safe":
        notes.append("no pickle; nothing executable")
    return {"scan_version": SCAN_VERSION, "path": path, "safe": verdict == "safe", "verdict": verdict,
            "reasons": reasons, "unreadable": unreadable, "notes": notes, "files": files}


# --- text --------------------------------------------------------------------------------


def format_scan(result: dict) -> str:
    lines = [f"path:    {result['path']}"]
    verdict = result["verdict"]
    if verdict == "safe":
        lines.append("verdict: safe" + (f" ({result['notes'][-1]})" if result.get("notes") else
                                        " (only allowlisted data types: containers, numbers, tensor rebuilding)"))
    elif verdict == "unsafe":
        lines.append(f"verdict: UNSAFE - loading with pickle/torch.load(weights_only=False) could run code "
                     f"({len(result['reasons'])} reasons)")
        lines += [f"  - {r}" for r in result["reasons"]]
    else:
        lines.append(f"verdict: unreadable ({len(result['unreadable'])} files could not be decoded)")
    for f in result["files"]:
        lines.append(f"{f['path']}: {f['format']}, {f['verdict']}" + (f" ({f['error']})" if f.get("error") else ""))
        for p in f["pickles"]:
            calls = ", ".join(f"{op} {t} x{n}" for op, c in p["calls"].items() for t, n in c.items())
            lines.append(f"  {p['name']}: protocol {p['protocol']}, {p['n_opcodes']} opcodes"
                         + (f", {p['persistent_ids']} persistent ids" if p["persistent_ids"] else ""))
            if p["globals"]:
                lines.append(f"    globals: {', '.join(p['globals'])}")
            if calls:
                lines.append(f"    calls:   {calls}")
            for n in p.get("nested", []):
                lines.append(f"    nested pickle ({n['name'].rsplit(' > ', 1)[-1]}): globals: "
                             f"{', '.join(n['globals']) or '(none)'}")
        for note in f.get("notes", []):
            lines.append(f"  note: {note}")
    return "\n".join(lines)
