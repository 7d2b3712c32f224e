"""The pickle opcodes, how their arguments are encoded, and every limit of the pickle machine.

`decode_arg` reads one opcode's argument without executing anything; `iter_opcodes` is the
same decoder as a generator (for tools and tests); the machine (`pickle_vm`) uses it in
its own loop. `Limits` holds every resource bound of the machine in one place.
"""
from __future__ import annotations

import codecs
import struct
from dataclasses import dataclass
from typing import Iterator

from ..errors import FormatError

# --- limits ----------------------------------------------------------------------------


@dataclass
class Limits:
    """Every resource bound of the pickle machine. Real checkpoints stay far below each one."""

    max_ops: int = 50_000_000
    max_memo: int = 4_000_000
    max_stack: int = 4_000_000
    max_marks: int = 100_000  # MARK nesting
    max_long_bytes: int = 1024  # LONG1/LONG4 payload; text INT/LONG lines are capped by max_line
    max_line: int = 4096  # text opcodes (protocol 0 ints, floats, GLOBAL names)
    max_depth: int = 200  # nesting of the finished object graph
    max_key_items: int = 4096  # elements in one tuple used as a dict key
    max_key_depth: int = 16  # nesting of tuples inside a dict key
    work_base: int = 1 << 22  # handler work units (items checked, bytes copied) allowed up front...
    work_per_byte: int = 8  # ...plus this many per pickle byte consumed (about 0.1 us each)
    tree_factor: int = 4  # the result walked as a tree may have this many nodes per reference...
    tree_slack: int = 1 << 20  # ...plus this many: more is a sharing bomb
    max_pickle_bytes: int = 1 << 30  # a pickle (data.pkl) larger than this is refused rather than read
    nested_depth: int = 3  # scan: pickles inside pickles followed this deep
    max_listed: int = 200  # scan: globals / reasons / extension codes kept per pickle
    max_nested_listed: int = 20  # scan: nested pickles kept per pickle
    max_named_results: int = 1 << 16  # scan: call results remembered by origin (for messages)


DEFAULT_LIMITS = Limits()

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


class Malformed(Exception):
    """The pickle is malformed here (an unpickler stops too); the machine adds where."""


def _read_line(data, pos: int, end: int, max_line: int) -> tuple[bytes, int]:
    # Lines are short in practice: look at 64 bytes first, the whole allowance only if needed.
    for width in (64, max_line + 1):
        stop = min(end, pos + width)
        chunk = bytes(data[pos:stop])
        nl = chunk.find(b"\n")
        if nl >= 0:
            return chunk[:nl], pos + nl + 1
    raise Malformed("unterminated text argument" if stop == end else "text argument too long")


def _decode_string_literal(line: bytes) -> bytes:
    # Protocol 0 STRING: a Python 2 repr, quoted with ' or ".
    if len(line) < 2 or line[:1] != line[-1:] or line[:1] not in (b"'", b'"'):
        raise Malformed("STRING argument is not quoted")
    return codecs.escape_decode(line[1:-1])[0]


def decode_arg(name: str, data, pos: int, end: int, limits: Limits):
    """(argument, new position) of the opcode `name` whose argument starts at `pos`."""
    if name in _NO_ARG:
        return None, pos
    if name in _FIXED:
        fmt = _FIXED[name]
        size = struct.calcsize(fmt)
        if pos + size > end:
            raise Malformed(f"{name} argument runs past the end of the data")
        return struct.unpack_from(fmt, data, pos)[0], pos + size
    if name in _COUNTED:
        fmt, kind = _COUNTED[name]
        size = struct.calcsize(fmt)
        if pos + size > end:
            raise Malformed(f"{name} length runs past the end of the data")
        n = struct.unpack_from(fmt, data, pos)[0]
        pos += size
        if n < 0:
            raise Malformed(f"{name} has a negative length")
        if kind == "long" and n > limits.max_long_bytes:
            raise Malformed(f"{name} integer of {n} bytes exceeds the limit of {limits.max_long_bytes}")
        if n > end - pos:
            raise Malformed(f"{name} of {n} bytes runs past the end of the data")
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
        return raw, pos  # str8: Python 2 str, decoded by the machine
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
    module, pos = _read_line(data, pos, end, limits.max_line)  # GLOBAL, INST
    qual, pos = _read_line(data, pos, end, limits.max_line)
    return (module.decode("utf-8"), qual.decode("utf-8")), pos


DECODE_ERRORS = (Malformed, ValueError, UnicodeDecodeError, struct.error)


@dataclass
class Op:
    pos: int
    name: str
    arg: object = None


def iter_opcodes(data, start: int = 0, *, path=None, limits: Limits = DEFAULT_LIMITS) -> Iterator[Op]:
    """The machine's decoder on its own: opcodes from `start` up to and including STOP."""
    end = len(data)
    pos, count = start, 0
    while True:
        if pos >= end:
            raise FormatError(path, f"pickle at byte {start} is truncated (no STOP opcode)")
        name = OPNAMES.get(data[pos])
        if name is None:
            raise FormatError(path, f"bad pickle: unknown opcode 0x{data[pos]:02x} at byte {pos}")
        count += 1
        if count > limits.max_ops:
            raise FormatError(path, f"pickle exceeds {limits.max_ops} opcodes")
        try:
            arg, new = decode_arg(name, data, pos + 1, end, limits)
        except DECODE_ERRORS as e:
            raise FormatError(path, f"bad pickle at byte {pos} ({name}): {e}") from None
        yield Op(pos, name, arg)
        if name == "STOP":
            return
        pos = new
