"""Hostile inputs for every reader, built by code (no binary blobs in the repository).

Pickles are assembled opcode by opcode (no torch, no importing what they name), torch
archives by a small zip writer whose every field can be falsified, legacy torch files
from their documented layout, and header bombs by patching small valid files that
wconv's own writers produce. `build_corpus(directory, canary)` writes everything and
returns the list of `Case`s; each says what the library must raise (a regex over the
WconvError message) and what `wconv scan` must conclude.

Any payload that would run, runs `touch <canary>` / open(<canary>, "w"): tests assert
the canary never appears.

This module also holds the subprocess worker (`python tests/hostile.py JOBS.json`): it
imports only wconv, applies an address-space limit, runs every operation of every job
and prints JSON results, so hostile inputs are tried with bounded memory and time.
"""
from __future__ import annotations

import io
import json
import os
import pickle
import struct
import zlib
from dataclasses import asdict, dataclass, field

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C

# --- a pickle assembler (protocol 2 opcodes unless said otherwise) ---------------------------


def glob(module: str, name: str) -> bytes:
    return b"c" + f"{module}\n{name}\n".encode()


def ustr(s: str) -> bytes:
    b = s.encode("utf-8")
    return b"X" + struct.pack("<I", len(b)) + b


def raw_bytes(b: bytes) -> bytes:
    return b"B" + struct.pack("<I", len(b)) + b  # BINBYTES (protocol 3+)


def pint(n: int) -> bytes:
    if 0 <= n < 256:
        return b"K" + bytes([n])
    if 0 <= n < 65536:
        return b"M" + struct.pack("<H", n)
    if -2 ** 31 <= n < 2 ** 31:
        return b"J" + struct.pack("<i", n)
    raw = n.to_bytes((n.bit_length() + 8) // 8, "little", signed=True)
    return b"\x8a" + bytes([len(raw)]) + raw


def tup(*items: bytes) -> bytes:
    return b"(" + b"".join(items) + b"t"


def call(func: bytes, *args: bytes) -> bytes:
    return func + tup(*args) + b"R"


def dict_items(pairs) -> bytes:
    return b"(" + b"".join(k + v for k, v in pairs) + b"u" if pairs else b""


def odict(pairs=()) -> bytes:
    return call(glob("collections", "OrderedDict")) + dict_items(pairs)


def pdict(pairs=()) -> bytes:
    return b"}" + dict_items(pairs)


def pickle_of(body: bytes, proto: int = 2) -> bytes:
    return b"\x80" + bytes([proto]) + body + b"."


def storage_pid(key: str, numel: int, stype: str = "FloatStorage", *, legacy=False) -> bytes:
    parts = [ustr("storage"), glob("torch", stype), ustr(key), ustr("cpu"), pint(numel)]
    if legacy:
        parts.append(b"N")
    return tup(*parts) + b"Q"  # BINPERSID


def contiguous(size) -> tuple:
    strides, acc = [], 1
    for s in reversed(size):
        strides.append(acc)
        acc *= s
    return tuple(reversed(strides))


def tensor(key: str, numel: int, size, stride=None, offset: int = 0, stype="FloatStorage", legacy=False) -> bytes:
    stride = contiguous(size) if stride is None else stride
    return call(glob("torch._utils", "_rebuild_tensor_v2"), storage_pid(key, numel, stype, legacy=legacy),
                pint(offset), tup(*map(pint, size)), tup(*map(pint, stride)), b"\x89", odict())


# --- a zip writer whose fields can lie --------------------------------------------------------


@dataclass
class Member:
    name: str
    data: bytes
    method: int = 0  # 0 stored, 8 deflate
    local_name: str | None = None  # name in the local header (default: name)
    crc: int | None = None  # declared CRC (default: the real one)
    size: int | None = None  # declared uncompressed size
    csize: int | None = None  # declared compressed size
    payload: bytes | None = None  # bytes stored after the local header (default: data, compressed)
    flags: int = 0
    lho_of: str | None = None  # central entry points at another member's local header (written once)


def make_zip(members, *, prefix: bytes = b"", adjust_offsets: bool = True, comment: bytes = b"",
             comment_len: int | None = None, trailing: bytes = b"", n_entries: int | None = None,
             between: bytes = b"", after_cd: bytes = b"", cd_size_delta: int = 0) -> bytes:
    """A zip archive; keyword arguments falsify the archive-level fields."""
    out = bytearray(prefix)
    bias = 0 if adjust_offsets else len(prefix)
    offsets, central = {}, bytearray()
    for m in members:
        payload = m.payload
        if payload is None:
            payload = m.data if m.method == 0 else _deflate(m.data)
        crc = zlib.crc32(m.data) if m.crc is None else m.crc
        size = len(m.data) if m.size is None else m.size
        csize = len(payload) if m.csize is None else m.csize
        name = m.name.encode()
        if m.lho_of is None:
            offsets[m.name] = len(out) - bias
            local = (m.local_name if m.local_name is not None else m.name).encode()
            out += struct.pack("<4sHHHHHIIIHH", b"PK\x03\x04", 20, m.flags, m.method, 0, 0x21, crc, csize, size,
                               len(local), 0) + local + payload
        lho = offsets[m.lho_of] if m.lho_of is not None else offsets[m.name]
        central += struct.pack("<4sHHHHHHIIIHHHHHII", b"PK\x01\x02", 20, 20, m.flags, m.method, 0, 0x21, crc,
                               csize, size, len(name), 0, 0, 0, 0, 0, lho) + name
    out += between
    cd_offset = len(out) - bias
    out += central + after_cd
    n = len(members) if n_entries is None else n_entries
    clen = len(comment) if comment_len is None else comment_len
    out += struct.pack("<4sHHHHIIH", b"PK\x05\x06", 0, 0, n, n, len(central) + cd_size_delta, cd_offset, clen)
    return bytes(out + comment + trailing)


def _deflate(data: bytes) -> bytes:
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    return c.compress(data) + c.flush()


def torch_members(pkl: bytes, blobs: dict, arch: str = "archive", **pkl_fields) -> list:
    members = [Member(f"{arch}/data.pkl", pkl, **pkl_fields), Member(f"{arch}/byteorder", b"little")]
    members += [Member(f"{arch}/data/{k}", v) for k, v in blobs.items()]
    members.append(Member(f"{arch}/version", b"3\n"))
    return members


def torch_zip(pkl: bytes, blobs: dict | None = None, arch: str = "archive", **zip_fields) -> bytes:
    """A torch.save-style zip archive (same member names and records torch writes)."""
    return make_zip(torch_members(pkl, blobs or {}, arch), **zip_fields)


def torch_legacy(main: bytes, storages=(), keys=None, *, counts=None) -> bytes:
    """A pre-1.6 torch.save stream: five pickles, then [int64 count][data] per storage."""
    out = io.BytesIO()
    for header in (LEGACY_MAGIC, 1001, {"protocol_version": 1001, "little_endian": True,
                                        "type_sizes": {"short": 2, "int": 4, "long": 8}}):
        out.write(pickle.dumps(header, protocol=2))  # plain data: ints and a dict
    out.write(main)
    keys = [k for k, _, _ in storages] if keys is None else keys
    out.write(pickle.dumps(list(keys), protocol=2))
    for i, (key, itemsize, data) in enumerate(storages):
        count = len(data) // itemsize if counts is None else counts[i]
        out.write(struct.pack("<q", count) + data)
    return out.getvalue()


def f32(*values) -> bytes:
    return struct.pack(f"<{len(values)}f", *values)


# --- small valid files ------------------------------------------------------------------------

TINY = dict(dim=4, n_layers=1, n_heads=2, n_kv_heads=2, vocab_size=8, hidden_dim=8, max_seq_len=8)


def _llama_shapes(dim, n_layers, n_heads, n_kv_heads, vocab_size, hidden_dim, **_):
    kv = n_kv_heads * (dim // n_heads)
    shapes = {"tok_embeddings.weight": (vocab_size, dim), "norm.weight": (dim,), "output.weight": (vocab_size, dim)}
    for i in range(n_layers):
        p = f"layers.{i}."
        shapes.update({p + "attention.wq.weight": (dim, dim), p + "attention.wk.weight": (kv, dim),
                       p + "attention.wv.weight": (kv, dim), p + "attention.wo.weight": (dim, dim),
                       p + "feed_forward.w1.weight": (hidden_dim, dim), p + "feed_forward.w2.weight": (dim, hidden_dim),
                       p + "feed_forward.w3.weight": (hidden_dim, dim), p + "attention_norm.weight": (dim,),
                       p + "ffn_norm.weight": (dim,)})
    return shapes


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def model_args(**over) -> bytes:
    args = dict(TINY, norm_eps=1e-5, multiple_of=8, dropout=0.0)
    args.update(over)
    return pdict([(ustr(k), pint(v) if isinstance(v, int) else b"G" + struct.pack(">d", v))
                  for k, v in args.items()])


def llama2c_ckpt(*, legacy=False, override=None, args=None) -> tuple[bytes, dict]:
    """(pickle, blobs) of a tiny llama2.c train.py checkpoint: {"model": ..., "model_args": ...}.

    `override(name, key, shape) -> tensor pickle or None` replaces single tensor records.
    """
    a = dict(TINY, **(args or {}))
    entries, blobs = [], {}
    for i, (name, shape) in enumerate(_llama_shapes(**a).items()):
        key = str(i)
        n = _numel(shape)
        rec = override(name, key, shape) if override else None
        if rec is None:
            rec = tensor(key, n, shape, legacy=legacy)
            vals = [((j * 7 + i) % 13 - 6) / 8 for j in range(n)] if n <= 1 << 16 else None
            blobs[key] = f32(*vals) if vals is not None else b""
        entries.append((ustr(name), rec))
    body = pdict([(ustr("model"), odict(entries)), (ustr("model_args"), model_args(**(args or {}))),
                  (ustr("iter_num"), pint(7))])
    return pickle_of(body), blobs


def small_tree(*, legacy=False) -> tuple[bytes, dict]:
    """A small torch.save tree (two tensors, a nested dict, a tensor shared twice)."""
    shared = tensor("1", 2, (2,), legacy=legacy)
    body = pdict([(ustr("model"), odict([(ustr("w"), tensor("0", 6, (2, 3), legacy=legacy)),
                                         (ustr("b"), shared + b"q\x05")])),
                  (ustr("cfg"), pdict([(ustr("lr"), b"G" + struct.pack(">d", 0.5)), (ustr("again"), b"h\x05")]))])
    return pickle_of(body), {"0": f32(1, 2, 3, 4, 5, 6), "1": f32(7, 8)}


def small_torch_zip() -> bytes:
    pkl, blobs = small_tree()
    return torch_zip(pkl, blobs)


def small_torch_legacy() -> bytes:
    pkl, blobs = small_tree(legacy=True)
    return torch_legacy(pkl, [(k, 4, v) for k, v in blobs.items()])


def tiny_model():
    """A tiny random llama Model (internal representation) for the writers."""
    import numpy as np

    from wconv import arch
    from wconv.model import Config, Model
    from wconv.tensor import LazyTensor

    cfg = Config(arch="llama", norm_eps=1e-5, rope_theta=10000.0, tie_embeddings=False, **TINY)
    rng = np.random.default_rng(0)
    model = Model(config=cfg, source_format="memory", source_layout="canonical")
    meta = _llama_shapes(**TINY)
    llama = arch.require("llama")
    for name in llama.expected_names(cfg):
        shape = meta[llama.from_canonical(name, "meta")]
        model.add(LazyTensor.from_array(name, rng.standard_normal(shape).astype(np.float32)))
    return model


def tiny_tokenizer():
    from wconv.model import Tokenizer

    n = TINY["vocab_size"] - 3
    pieces = [b"<unk>", b"<s>", b"</s>"] + [bytes([0xE2, 0x96, 0x81]) + bytes([97 + i]) for i in range(n)]
    return Tokenizer(model="llama", tokens=pieces, scores=[0.0, 0.0, 0.0] + [-float(i) for i in range(n)],
                     token_types=[2, 3, 3] + [1] * n, bos_id=1, eos_id=2, unk_id=0)


def _pb_varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _pb_field(num: int, wire: int, payload: bytes) -> bytes:
    if wire == 2:
        return _pb_varint(num << 3 | 2) + _pb_varint(len(payload)) + payload
    return _pb_varint(num << 3 | wire) + payload


def sentencepiece_model(tokenizer=None) -> bytes:
    """A minimal sentencepiece ModelProto (pieces + trainer spec) from the protobuf schema."""
    tok = tokenizer or tiny_tokenizer()
    out = bytearray()
    for piece, score, kind in zip(tok.tokens, tok.scores, tok.token_types):
        body = _pb_field(1, 2, bytes(piece)) + _pb_field(2, 5, struct.pack("<f", score)) + \
            _pb_field(3, 0, _pb_varint(kind))
        out += _pb_field(1, 2, body)
    trainer = _pb_field(3, 0, _pb_varint(2)) + _pb_field(40, 0, _pb_varint(0)) + \
        _pb_field(41, 0, _pb_varint(1)) + _pb_field(42, 0, _pb_varint(2))
    out += _pb_field(2, 2, trainer)
    return bytes(out)


def write_valid_files(directory) -> dict:
    """Small valid files of every format: {kind: path}. Written by wconv's writers where it has one."""
    from wconv.formats import ggml_legacy, gguf_io, llama2c, llama2c_tokenizer, safetensors_io

    os.makedirs(directory, exist_ok=True)
    model = tiny_model()
    model.tokenizer = tiny_tokenizer()
    paths = {}

    def out(name):
        paths[name.split(".")[0]] = p = os.path.join(directory, name)
        return p

    gguf_io.write(model, out("gguf.gguf"), quiet=True)
    safetensors_io.write(model, out("safetensors.safetensors"), quiet=True)
    llama2c.write(model, out("llama2c_v0.bin"), quiet=True, version=0)
    llama2c.write(model, out("llama2c_v1.bin"), quiet=True, version=1)
    llama2c.write(model, out("llama2c_v2.bin"), quiet=True, version=2, group_size=4)
    ggml_legacy.write_ggjt(model, out("ggjt.ggjt"), quiet=True)
    llama2c_tokenizer.write(model.tokenizer, out("tokenizer.bin"))
    with open(out("sentencepiece.model"), "wb") as f:
        f.write(sentencepiece_model())
    with open(out("torch_zip.pt"), "wb") as f:
        f.write(small_torch_zip())
    with open(out("torch_legacy.pt"), "wb") as f:
        f.write(small_torch_legacy())
    return paths


# --- cases ------------------------------------------------------------------------------------


@dataclass
class Case:
    name: str
    path: str
    error: str = ""  # regex the WconvError from loading (and reading every tensor) must match
    scan: str | None = None  # "safe" | "unreadable" | "unsafe:<regex>" | None (anything but a crash)
    inspect_ok: bool = False  # plain `inspect` may succeed (it reads no tensor data)
    kind: str = "model"  # "model" or "tokenizer"
    ops: list | None = None  # worker operations (default: all for the kind)
    cli: bool = False  # part of the CLI subset
    tags: list = field(default_factory=list)


def payloads(canary: str) -> list:
    """(name, pickle bytes, load-error regex, scan expectation) of code-running and malformed pickles."""
    cmd = f"touch {canary}"
    touch = ustr(cmd)
    inner = pickle_of(call(glob("os", "system"), touch))
    ext_cases = []
    for name, code in zip(("ext1", "ext2", "ext4"), EXTENSIONS):
        ext_cases.append((f"{name}_registered", _ext_pickle(code, canary), "extension", "unsafe:extension"))
    memo_overwrite = (b"\x80\x04" + b"\x8c\x0bcollections\x94\x8c\x0bOrderedDict\x94"
                      + b"\x8c\x02os\x94\x8c\x06system\x94" + b"h\x02q\x00h\x03q\x010"  # PUT 0/1 overwritten
                      + b"0" + b"h\x00h\x01\x93" + tup(touch) + b"R.")
    bomb = b"\x80\x02]q\x000"
    for i in range(1, 61):
        bomb += b"(h" + bytes([i - 1]) + b"h" + bytes([i - 1]) + b"lq" + bytes([i]) + b"0"
    bomb += b"h" + bytes([60]) + b"."
    # Sharing just under the interpreter's limit (a 2**18-leaf tree over 17 lists), with
    # placeholders at the leaves: `inspect --allow-unknown-globals` must stay bounded.
    shared = b"\x80\x02" + call(glob("os", "system"), touch) + b"q\x000"
    for i in range(1, 18):
        shared += b"(h" + bytes([i - 1]) + b"h" + bytes([i - 1]) + b"lq" + bytes([i]) + b"0"
    shared += b"}" + ustr("stats") + b"h" + bytes([17]) + b"s."
    n = 100_000
    deep_dicts = b"\x80\x02}" + (b"X\x01\x00\x00\x00a}") * n + b"s" * n + b"."
    return [
        ("os_system_global", pickle_of(call(glob("os", "system"), touch)), r"os\.system", r"unsafe:os\.system"),
        ("posix_system_stack_global", b"\x80\x04\x8c\x05posix\x8c\x06system\x93" + tup(touch) + b"R.",
         r"posix\.system", r"unsafe:posix\.system"),
        ("subprocess_popen", pickle_of(call(glob("subprocess", "Popen"), b"(" + ustr("touch") + ustr(canary) + b"l")),
         r"subprocess\.Popen", r"unsafe:subprocess\.Popen"),
        ("builtins_eval", pickle_of(call(glob("builtins", "eval"), ustr(f"open({canary!r}, 'w')"))),
         r"builtins\.eval", r"unsafe:builtins\.eval"),
        ("builtins_exec", pickle_of(call(glob("builtins", "exec"), ustr(f"open({canary!r}, 'w')"))),
         r"builtins\.exec", r"unsafe:builtins\.exec"),
        ("py2_builtin_eval", pickle_of(call(glob("__builtin__", "eval"), ustr(f"open({canary!r}, 'w')"))),
         r"builtins\.eval", r"unsafe:builtins\.eval"),
        ("getattr_import_chain", pickle_of(call(call(glob("builtins", "getattr"),
                                                     call(glob("builtins", "__import__"), ustr("os")), ustr("system")),
                                                touch)), r"builtins\.getattr", r"unsafe:builtins\.__import__"),
        ("builtins_import", pickle_of(call(glob("builtins", "__import__"), ustr("os"))), r"builtins\.__import__",
         r"unsafe:builtins\.__import__"),
        ("builtins_open", pickle_of(call(glob("builtins", "open"), ustr(canary), ustr("w"))), r"builtins\.open",
         r"unsafe:builtins\.open"),
        ("torch_load", pickle_of(call(glob("torch", "load"), ustr(canary))), r"torch\.load", r"unsafe:torch\.load"),
        ("torch_serialization_load", pickle_of(call(glob("torch.serialization", "load"), ustr(canary))),
         r"torch\.serialization\.load", r"unsafe:torch\.serialization\.load"),
        ("nested_pickle_loads", pickle_of(call(glob("pickle", "loads"), raw_bytes(inner)), proto=4),
         r"pickle\.loads", r"unsafe:nested pickle: global os\.system"),
        ("nested__pickle_loads", pickle_of(call(glob("_pickle", "loads"), raw_bytes(inner)), proto=4),
         r"_pickle\.loads", r"unsafe:_pickle\.loads"),
        ("inst_proto0", b"(S'" + cmd.encode() + b"'\nios\nsystem\n.", r"os\.system", r"unsafe:INST instantiates os\.system"),
        ("obj", pickle_of(b"(" + glob("os", "system") + touch + b"o"), r"os\.system", r"unsafe:OBJ instantiates os\.system"),
        ("obj_on_allowed_type", pickle_of(b"(" + glob("collections", "OrderedDict") + b"o"), r"OBJ",
         r"unsafe:OBJ instantiates collections\.OrderedDict"),
        ("newobj_popen", pickle_of(glob("subprocess", "Popen") + tup(touch) + b"\x81"), r"subprocess\.Popen",
         r"unsafe:subprocess\.Popen"),
        ("newobj_ex_popen", pickle_of(glob("subprocess", "Popen") + tup(touch) + b"}\x92", proto=4),
         r"subprocess\.Popen", r"unsafe:subprocess\.Popen"),
        ("reduce_type_token", pickle_of(call(glob("builtins", "list"))), r"builtins\.list.*cannot be called",
         r"unsafe:REDUCE calls builtins\.list"),
        ("newobj_on_ordered_dict", pickle_of(glob("collections", "OrderedDict") + b")\x81"), r"NEWOBJ",
         r"unsafe:NEWOBJ instantiates collections\.OrderedDict"),
        ("reduce_on_computed", pickle_of(call(call(glob("collections", "OrderedDict")))), r"cannot call",
         r"unsafe:REDUCE calls the result of collections\.OrderedDict"),
        ("build_class_on_ordered_dict", pickle_of(odict() + pdict([(ustr("__class__"), glob("builtins", "dict"))]) + b"b"),
         r"__class__", r"unsafe:BUILD on collections\.OrderedDict sets attribute __class__"),
        ("build_reduce_on_ordered_dict", pickle_of(odict() + pdict([(ustr("__reduce__"), ustr("x"))]) + b"b"),
         r"__reduce__", r"unsafe:__reduce__"),
        ("build_slotstate_on_ordered_dict",
         pickle_of(odict() + b"N" + pdict([(ustr("__class__"), glob("builtins", "dict"))]) + b"\x86b"),
         r"slot state|__class__", r"unsafe:slot state"),
        ("build_on_namespace", pickle_of(glob("argparse", "Namespace") + b")\x81" + b"N"
                                         + pdict([(ustr("__class__"), glob("builtins", "dict"))]) + b"\x86b"),
         r"slot state|__class__", r"unsafe:slot state"),
        ("build_dict_on_tuple", pickle_of(b")" + pdict([(ustr("a"), pint(1))]) + b"b"), r"BUILD.*tuple",
         r"unsafe:BUILD sets the state of tuple"),
        ("build_on_list", pickle_of(b"]" + pdict([(ustr("append"), ustr("x"))]) + b"b"), r"BUILD.*list",
         r"unsafe:BUILD sets the state of list"),
        *ext_cases,
        ("next_buffer", b"\x80\x05\x97.", r"out-of-band", r"unsafe:out-of-band"),
        ("readonly_buffer", b"\x80\x05\x97\x98.", r"out-of-band", r"unsafe:out-of-band"),
        ("memo_get_missing", b"\x80\x02h\x05.", r"never stored", None),
        ("memo_long_get_huge", b"\x80\x02j\xf0\xff\xff\xff.", r"never stored", None),
        ("memo_put_huge_text_index", b"\x80\x02Np" + b"9" * 30 + b"\n.", r"memo index out of range", None),
        ("memo_put_overwrite", memo_overwrite, r"os\.system", r"unsafe:os\.system"),
        ("memo_flood", b"\x80\x04N" + b"\x94" * 4_100_000 + b".", r"memo entries", None),
        ("deep_lists", b"\x80\x02" + b"]" * n + b"a" * (n - 1) + b".", r"nested", None),
        ("deep_tuples", b"\x80\x02N" + b"\x85" * n + b".", r"nested", None),
        ("deep_dicts", deep_dicts, r"nested", None),
        ("mark_flood", b"\x80\x02" + b"(" * (2 * n) + b".", r"MARK", None),
        ("sharing_bomb", bomb, r"enormous tree", None),
        ("sharing_wide_placeholders", shared, r"os\.system", r"unsafe:os\.system"),
        ("cycle", b"\x80\x02]q\x00h\x00a.", r"cycle", None),
        ("huge_long4", b"\x80\x02\x8b\xff\xff\xff\x7f" + b"\0" * 16 + b".", r"LONG4", None),
        ("huge_binbytes8", b"\x80\x04\x8e" + struct.pack("<Q", 1 << 62) + b"abc.", r"past the end", None),
        ("huge_frame", b"\x80\x04\x95" + struct.pack("<Q", 1 << 60) + b"N.", r"FRAME", None),
        ("huge_text_int", b"I" + b"9" * 100_000 + b"\n.", r"too long", None),
        ("unknown_opcode", b"\x80\x02\xff.", r"unknown opcode", None),
        ("protocol_9", b"\x80\x09N.", r"protocol", None),
        ("no_stop", b"\x80\x02N", r"truncated|STOP", None),
    ]


# Extension codes the corpus uses, and what the worker process registers them as.
EXTENSIONS = {0xF0: ("system", "touch"), 0x1234: ("eval", "open"), 0x123456: ("exec", "open")}


def _ext_func(code):
    import builtins

    fname = EXTENSIONS[code][0]
    return os.system if fname == "system" else getattr(builtins, fname)


def _ext_pickle(code: int, canary: str) -> bytes:
    import copyreg

    func = _ext_func(code)
    arg = f"touch {canary}" if func is os.system else f"open({canary!r}, 'w')"
    op = b"\x82" + bytes([code]) if code < 256 else (
        b"\x83" + struct.pack("<H", code) if code < 65536 else b"\x84" + struct.pack("<i", code))
    # The bytes pickle itself emits for an object reducing to `func` while the extension
    # is registered (checked here, then unregistered).
    copyreg.add_extension(func.__module__, func.__name__, code)
    try:
        class _Evil:
            def __reduce__(self):
                return (func, (arg,))

        real = pickle.dumps(_Evil(), protocol=2)
        assert op in real, "pickle did not use the extension registry"
    finally:
        copyreg.remove_extension(func.__module__, func.__name__, code)
    return pickle_of(op + tup(ustr(arg)) + b"R")




def ckpt_with(record, *, legacy=False) -> tuple[bytes, dict]:
    """The tiny checkpoint with tok_embeddings.weight ([8, 4] floats, storage key "0")
    replaced by `record` (pickle bytes); blob "0" is left to the caller."""
    pkl, blobs = llama2c_ckpt(legacy=legacy, override=lambda name, key, shape: (
        record if name == "tok_embeddings.weight" else None))
    return pkl, blobs


EMB = 8 * 4  # elements of the tiny model's token embedding: shape (8, 4)


def tensor_cases(write) -> list:
    """Torch archives whose tensor records or storages lie about sizes, offsets, keys."""
    emb = f32(*([0.5] * EMB))
    cases = []

    def add(name, record, error, *, blob=emb, scan="safe", inspect_ok=False):
        pkl, blobs = ckpt_with(record)
        if blob is not None:
            blobs["0"] = blob
        cases.append(Case(name, write(f"{name}.pt", torch_zip(pkl, blobs)), error, scan=scan,
                          inspect_ok=inspect_ok, tags=["tensor"]))

    add("size_beyond_blob", tensor("0", EMB, (1 << 40, 4)), r"beyond its storage")
    add("negative_size", tensor("0", EMB, (-1, 4), (4, 1)), r"negative, huge")
    add("size_2_63", tensor("0", EMB, (1 << 63, 4), (4, 1)), r"negative, huge")
    # inspect_ok: inspection shows what the file declares (here an unknown layout); only
    # reading the data, or converting, must fail.
    add("size_product_overflow", tensor("0", EMB, (1 << 40, 1 << 40, 1 << 40), (0, 0, 0)), r"matrix",
        inspect_ok=True)
    add("negative_stride", tensor("0", EMB, (8, 4), (-4, 1)), r"negative, huge")
    add("offset_beyond_blob", tensor("0", EMB, (8, 4), offset=1000), r"beyond its storage")
    add("offset_2_63", tensor("0", EMB, (8, 4), offset=1 << 63), r"offset")
    add("numel_2_63", tensor("0", 1 << 63, (8, 4)), r"element count")
    add("numel_negative", tensor("0", -5, (8, 4)), r"element count")
    add("numel_beyond_blob", tensor("0", 1 << 40, (8, 4)), r"has 128 bytes.*needs")
    add("size_stride_rank_mismatch", tensor("0", EMB, (8, 4), (1,)), r"differ in length")
    add("too_many_dims", tensor("0", EMB, (1,) * 70), r"dimensions")
    add("missing_blob", tensor("99", EMB, (8, 4)), r"data/99.*missing")
    add("key_path_traversal", tensor("../../../etc/passwd", EMB, (8, 4)), r"passwd")
    add("storage_not_a_storage", call(glob("torch._utils", "_rebuild_tensor_v2"), ustr("x"), pint(0),
                                      tup(pint(8), pint(4)), tup(pint(4), pint(1)), b"\x89", odict()),
        r"instead of a storage")
    add("build_on_tensor", tensor("0", EMB, (8, 4)) + pdict([(ustr("__class__"), ustr("x"))]) + b"b",
        r"BUILD", scan=r"unsafe:BUILD sets the state of torch\._utils\._rebuild_tensor_v2")
    add("persistent_id_not_storage", tup(ustr("module"), ustr("x")) + b"Q", r"persistent id")
    add("short_blob", tensor("0", EMB, (8, 4)), r"has 12 bytes", blob=b"\0" * 12)
    # A whole terabyte model: every tensor a zero-stride view of one float. Opening and
    # inspecting are fine (lazy); reading or converting must refuse without allocating.
    big = dict(dim=1 << 20, hidden_dim=1 << 20, vocab_size=1 << 20, n_heads=16, n_kv_heads=16)
    pkl, _ = llama2c_ckpt(args=big, override=lambda name, key, shape: tensor("0", 1, shape, (0,) * len(shape)))
    cases.append(Case("zero_stride_terabyte_model", write("zero_stride_terabyte_model.pt", torch_zip(pkl, {"0": f32(1)})),
                      r"expanded tensor view", scan="safe", inspect_ok=True, cli=True, tags=["tensor"]))
    return cases


def zip_cases(write) -> list:
    """Archives that parse differently depending on the zip reader, and zip bombs."""
    pkl, blobs = llama2c_ckpt()
    base = torch_members(pkl, blobs)
    cases = []

    def add(name, data, error, scan="unreadable", cli=False, inspect_ok=False):
        cases.append(Case(name, write(f"{name}.pt", data), error, scan=scan, cli=cli, inspect_ok=inspect_ok,
                          tags=["zip"]))

    def edit(i, **kw):
        ms = [Member(**asdict(m)) for m in base]
        for k, v in kw.items():
            setattr(ms[i], k, v)
        return ms

    add("bad_crc_pickle", make_zip(edit(0, crc=0xDEADBEEF)), r"CRC", cli=True)
    add("local_name_differs", make_zip(edit(0, local_name="archive/data.pk1")), r"different file")
    add("local_name_traversal", make_zip(edit(0, local_name="../../etc/passwd")), r"different file")
    add("member_named_traversal", make_zip(base + [Member("../../etc/passwd", b"root")]), r"etc/passwd")
    add("member_named_absolute", make_zip(base + [Member("/etc/passwd", b"root")]), r"/etc/passwd")
    add("duplicate_member", make_zip(base + [Member("archive/data/0", b"\0" * 16)]), r"twice")
    add("overlapping_members", make_zip(base + [Member("archive/extra", base[0].data, lho_of="archive/data.pkl")]),
        r"overlap")
    add("blob_overlaps_pickle", make_zip([m if m.name != "archive/data/0" else
                                          Member("archive/data/0", base[0].data, lho_of="archive/data.pkl")
                                          for m in base]), r"overlap|different file")
    add("junk_before_first_header", make_zip(base, prefix=b"PK\x03\x04" + b"\0" * 60), r"before")
    add("junk_before_unadjusted", make_zip(base, prefix=b"PK\x03\x04" + b"\0" * 60, adjust_offsets=False),
        r"local header|central directory|before")
    two = make_zip(base)
    evil = make_zip(torch_members(pickle_of(call(glob("os", "system"), ustr("true"))), {}))
    add("two_archives_concatenated", two + evil, r"central directory|local header|before")
    add("second_archive_adjusted", make_zip(torch_members(pickle_of(call(glob("os", "system"), ustr("true"))), {}),
                                            prefix=two), r"before", cli=True)
    add("eocd_in_comment", make_zip(base, comment=b"x" * 10 + _fake_eocd()), r"end-of-central-directory")
    add("comment_length_lies", make_zip(base, comment=b"hello", comment_len=500), r"end-of-central-directory")
    add("trailing_garbage", make_zip(base, trailing=b"\0" * 100), r"end-of-central-directory")
    add("data_between_cd_and_eocd", make_zip(base, after_cd=b"\0" * 64), r"central directory")
    add("cd_size_too_small", make_zip(base, cd_size_delta=-46), r"central directory")
    add("entry_count_lies", make_zip(base, n_entries=60000), r"entry count")
    add("zip64_without_locator", make_zip(base, n_entries=0xFFFF), r"zip64")
    add("encrypted_member", make_zip(edit(0, flags=1)), r"encrypted")
    add("bzip2_member", make_zip(edit(0, method=12)), r"compression method")
    # Zip bombs: a deflated data.pkl that inflates far beyond what it declares, or declares
    # a size no deflate stream can reach.
    big_pickle = pickle_of(raw_bytes(b"\0" * (1 << 22)), proto=4)
    add("deflate_bomb_small_declared", make_zip(edit(0, data=big_pickle, method=8, size=1000)), r"declared")
    add("deflate_huge_declared", make_zip(edit(0, method=8, size=900_000_000)), r"compression ratio")
    add("deflate_corrupt_stream", make_zip(edit(0, method=8, payload=b"\xff" * 64, csize=None)), r"corrupt")
    # A tensor blob that declares 1 GiB (a ratio deflate can reach) but inflates to 1 MiB.
    import random

    noise = random.Random(0).randbytes(1 << 20)
    pkl, blobs = ckpt_with(tensor("0", 1 << 28, (8, 4)))
    members = torch_members(pkl, blobs)
    members.insert(2, Member("archive/data/0", noise, method=8, size=1 << 30))
    add("deflate_blob_declares_more", make_zip(members), r"declared", scan="safe", inspect_ok=True)
    return cases


def _fake_eocd() -> bytes:
    return struct.pack("<4sHHHHIIH", b"PK\x05\x06", 0, 0, 1, 1, 46, 0, 0)


def legacy_cases(canary: str, write) -> list:
    touch = ustr(f"touch {canary}")
    cases = []

    def add(name, data, error, scan="safe", cli=False, inspect_ok=False):
        cases.append(Case(name, write(f"{name}.pt", data), error, scan=scan, cli=cli, inspect_ok=inspect_ok,
                          tags=["legacy"]))

    emb = f32(*([0.5] * EMB))

    def ckpt(record, storages=(("0", 4, emb),), **kw):
        pkl, blobs = ckpt_with(record, legacy=True)
        stor = [(k, 4, v) for k, v in blobs.items()] + [s for s in storages if s[0] not in blobs]
        keys = kw.pop("keys", None)
        if keys is not None:
            keys = keys + [k for k in blobs]
        count0 = kw.pop("count0", None)  # a false element count in storage "0"'s data header
        if count0 is not None:
            kw["counts"] = [count0 if k == "0" else len(v) // n for k, n, v in stor]
        return torch_legacy(pkl, stor, keys=keys, **kw)

    good = tensor("0", EMB, (8, 4), legacy=True)
    add("legacy_os_system", torch_legacy(pickle_of(call(glob("os", "system"), touch)), []), r"os\.system",
        scan=r"unsafe:os\.system", cli=True)
    add("legacy_module_source", ckpt(tup(ustr("module"), glob("torch.nn", "Linear"), ustr("src")) + b"Q"),
        r"nn\.Module|torch\.nn\.Linear", scan=r"unsafe:torch\.nn\.Linear")
    add("legacy_unused_storage", ckpt(good, [("0", 4, emb), ("zz", 4, emb)]), r"storage zz")
    add("legacy_missing_storage", ckpt(good, [], keys=[]), r"no data for storage 0")
    add("legacy_duplicate_key", ckpt(good, keys=["0", "0"]), r"twice")
    add("legacy_count_mismatch", ckpt(good, count0=1 << 40), r"storage 0 holds 1099511627776 elements",
        inspect_ok=True)  # counts are checked when a storage is read
    add("legacy_numel_huge", ckpt(tensor("0", (1 << 62) - 1, (8, 4), legacy=True)),
        r"element count|beyond the end|truncated")
    add("legacy_keys_pickle_malformed", ckpt(good).replace(pickle.dumps(["1"], protocol=2)[:3], b"\x80\x02}"), r"")
    add("legacy_wrong_magic", torch_legacy(odict(), []).replace(pickle.dumps(LEGACY_MAGIC, protocol=2),
                                                                pickle.dumps(LEGACY_MAGIC + 1, protocol=2)),
        r"not a torch checkpoint", scan="safe")
    add("legacy_protocol_version", torch_legacy(odict(), []).replace(pickle.dumps(1001, protocol=2),
                                                                     pickle.dumps(1002, protocol=2)),
        r"protocol version")
    return cases


def header_cases(valid: dict, write) -> list:
    """Valid small files of the non-pickle formats with header fields set to absurd values."""
    cases = []

    def add(name, data, error, kind="model", ext=".bin", scan=None, cli=False):
        cases.append(Case(name, write(name + ext, data), error, scan=scan, kind=kind, cli=cli, tags=["header"]))

    def patched(kind, offset, fmt, value):
        data = bytearray(open(valid[kind], "rb").read())
        struct.pack_into(fmt, data, offset, value)
        return bytes(data)

    # GGUF: magic, u32 version, u64 tensor_count, u64 kv_count, then key/value pairs.
    g = open(valid["gguf"], "rb").read()
    layout = gguf_layout(g)
    add("gguf_tensor_count_huge", patched("gguf", 8, "<Q", (1 << 63) - 1), r"tensor", ext=".gguf", cli=True)
    add("gguf_tensor_count_u64max", patched("gguf", 8, "<Q", (1 << 64) - 1), r"tensor", ext=".gguf")
    add("gguf_kv_count_huge", patched("gguf", 16, "<Q", (1 << 62)), r"", ext=".gguf")
    add("gguf_key_length_huge", patched("gguf", 24, "<Q", (1 << 64) - 1), r"", ext=".gguf")
    add("gguf_version_99", patched("gguf", 4, "<I", 99), r"version", ext=".gguf")
    arr = layout["first_array"]
    add("gguf_array_count_huge", patched("gguf", arr + 4, "<Q", 1 << 61), r"", ext=".gguf")
    add("gguf_array_type_bogus", patched("gguf", arr, "<I", 77), r"type", ext=".gguf")
    t0 = layout["tensors"][0]
    add("gguf_tensor_ndims_huge", patched("gguf", t0["n_dims_at"], "<I", 1 << 31), r"dim", ext=".gguf")
    add("gguf_tensor_dim_huge", patched("gguf", t0["dims_at"], "<Q", 1 << 62), r"", ext=".gguf")
    add("gguf_tensor_type_bogus", patched("gguf", t0["type_at"], "<I", 9999), r"type", ext=".gguf")
    add("gguf_tensor_offset_beyond", patched("gguf", t0["offset_at"], "<Q", 1 << 50), r"", ext=".gguf")
    if layout.get("alignment_value_at") is not None:
        add("gguf_alignment_zero", patched("gguf", layout["alignment_value_at"], "<I", 0), r"alignment", ext=".gguf")
        add("gguf_alignment_odd", patched("gguf", layout["alignment_value_at"], "<I", 3), r"alignment", ext=".gguf")
    # safetensors: u64 header length + JSON header.
    s = open(valid["safetensors"], "rb").read()
    (hlen,) = struct.unpack_from("<Q", s)
    header = json.loads(s[8:8 + hlen])
    body = s[8 + hlen:]

    def st(h, data=body, length=None):
        raw = json.dumps(h).encode() if isinstance(h, dict) else h
        return struct.pack("<Q", len(raw) if length is None else length) + raw + data

    first = next(k for k in header if k != "__metadata__")
    add("st_header_length_huge", st(header, length=1 << 63), r"header", ext=".safetensors", cli=True)
    add("st_header_length_beyond_file", st(header, length=len(s)), r"", ext=".safetensors")
    add("st_shape_huge", st({**header, first: {**header[first], "shape": [1 << 62, 1 << 62]}}), r"",
        ext=".safetensors")
    add("st_shape_negative", st({**header, first: {**header[first], "shape": [-1, 8]}}), r"", ext=".safetensors")
    add("st_offsets_beyond", st({**header, first: {**header[first], "data_offsets": [0, 1 << 60]}}), r"",
        ext=".safetensors")
    add("st_offsets_reversed", st({**header, first: {**header[first], "data_offsets": [64, 0]}}), r"",
        ext=".safetensors")
    add("st_dtype_bogus", st({**header, first: {**header[first], "dtype": "F128"}}), r"", ext=".safetensors")
    add("st_json_deep", st(b'{"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"), r"", ext=".safetensors")
    add("st_json_huge_int", st(b'{"a": {"dtype": "F32", "shape": [' + b"9" * 50_000 + b'], "data_offsets": [0, 4]}}'),
        r"", ext=".safetensors")
    add("st_not_json", st(b"{" + b"\xff" * 40), r"", ext=".safetensors")
    # llama2.c v1/v2: u32 magic, i32 version, 7 x i32 params (dim, hidden, layers, heads, kv heads, vocab, seq).
    for off, what in ((8, "dim"), (16, "n_layers"), (28, "vocab"), (32, "seq_len")):
        add(f"llama2c_v1_{what}_huge", patched("llama2c_v1", off, "<i", (1 << 31) - 1), r"", cli=what == "dim")
        add(f"llama2c_v2_{what}_negative", patched("llama2c_v2", off, "<i", -(1 << 31)), r"")
    add("llama2c_v2_group_zero", patched("llama2c_v2", 37, "<i", 0), r"group")
    add("llama2c_v2_group_huge", patched("llama2c_v2", 37, "<i", (1 << 31) - 1), r"group")
    add("llama2c_v0_dim_huge", patched("llama2c_v0", 0, "<i", (1 << 31) - 1), r"")
    # tokenizer.bin: u32 max_token_length, then (f32 score, i32 length, bytes) records.
    add("tokbin_max_len_huge", patched("tokenizer", 0, "<I", (1 << 32) - 1), r"max_token_length", kind="tokenizer")
    add("tokbin_token_len_huge", patched("tokenizer", 8, "<i", (1 << 31) - 1), r"length", kind="tokenizer")
    add("tokbin_token_len_negative", patched("tokenizer", 8, "<i", -1), r"length", kind="tokenizer")
    # ggjt: magic, version, 7 x u32 hparams, vocab records (u32 len, text, f32 score), tensors.
    add("ggjt_n_vocab_huge", patched("ggjt", 8, "<I", (1 << 32) - 1), r"", ext=".ggjt")
    add("ggjt_token_len_huge", patched("ggjt", 36, "<I", (1 << 32) - 1), r"", ext=".ggjt")
    j = ggjt_first_tensor(open(valid["ggjt"], "rb").read())
    add("ggjt_tensor_ndims_huge", patched("ggjt", j, "<I", (1 << 32) - 1), r"", ext=".ggjt")
    add("ggjt_tensor_name_len_huge", patched("ggjt", j + 4, "<I", (1 << 32) - 1), r"", ext=".ggjt")
    add("ggjt_tensor_type_bogus", patched("ggjt", j + 8, "<I", 9999), r"", ext=".ggjt")
    add("ggjt_tensor_dim_huge", patched("ggjt", j + 12, "<I", (1 << 32) - 1), r"", ext=".ggjt")
    # sentencepiece: protobuf length prefixes running past the end / 10-byte varints.
    spm = open(valid["sentencepiece"], "rb").read()
    add("spm_length_huge", b"\x0a" + _pb_varint((1 << 63) - 1) + spm[2:], r"", kind="tokenizer", ext=".model")
    add("spm_varint_overflow", b"\x0a" + b"\xff" * 10 + b"\x01" + spm[2:], r"", kind="tokenizer", ext=".model")
    add("spm_nested_length_beyond", spm[:2] + b"\x0a\x7f" + spm[4:], r"", kind="tokenizer", ext=".model")
    return cases


def gguf_layout(data: bytes) -> dict:
    """Byte offsets of GGUF header fields (parsed from the GGUF specification, not by wconv)."""
    sizes = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
    pos = 24
    n_tensors, n_kv = struct.unpack_from("<QQ", data, 8)
    out = {"first_array": None, "alignment_value_at": None, "tensors": []}

    def string(pos):
        (n,) = struct.unpack_from("<Q", data, pos)
        return data[pos + 8:pos + 8 + n], pos + 8 + n

    def value(vtype, pos):
        if vtype == 8:
            return string(pos)[1]
        if vtype == 9:
            if out["first_array"] is None:
                out["first_array"] = pos
            etype, count = struct.unpack_from("<IQ", data, pos)
            pos += 12
            for _ in range(count):
                pos = value(etype, pos)
            return pos
        return pos + sizes[vtype]

    for _ in range(n_kv):
        key, pos = string(pos)
        (vtype,) = struct.unpack_from("<I", data, pos)
        if key == b"general.alignment":
            out["alignment_value_at"] = pos + 4
        pos = value(vtype, pos + 4)
    for _ in range(n_tensors):
        _, pos = string(pos)
        (nd,) = struct.unpack_from("<I", data, pos)
        t = {"n_dims_at": pos, "dims_at": pos + 4, "type_at": pos + 4 + 8 * nd, "offset_at": pos + 8 + 8 * nd}
        out["tensors"].append(t)
        pos += 4 + 8 * nd + 4 + 8
    return out


def ggjt_first_tensor(data: bytes) -> int:
    (n_vocab,) = struct.unpack_from("<I", data, 8)
    pos = 36
    for _ in range(n_vocab):
        (n,) = struct.unpack_from("<I", data, pos)
        pos += 4 + n + 4
    return pos


# Payloads that take a noticeable time to interpret: one conversion (they all fail while
# loading, the same way), and only loading and scanning in the legacy and raw forms.
SLOW_ZIP_OPS = ["load", "inspect", "inspect_unknown", "scan", "convert:gguf"]
SLOW_PAYLOADS = {"memo_flood", "deep_lists", "deep_tuples", "deep_dicts", "mark_flood", "sharing_bomb",
                 "sharing_wide_placeholders"}


def build_corpus(directory, canary) -> tuple[list, dict]:
    """Write every hostile input under `directory`; return (Cases, {kind: valid file})."""
    directory, canary = os.fspath(directory), os.fspath(canary)
    os.makedirs(directory, exist_ok=True)

    def write(name, data):
        path = os.path.join(directory, name)
        with open(path, "wb") as f:
            f.write(data)
        return path

    cases = []
    cli_payloads = {"os_system_global", "nested_pickle_loads", "ext1_registered", "sharing_bomb",
                    "build_class_on_ordered_dict", "sharing_wide_placeholders"}
    for name, pkl, error, scan in payloads(canary):
        # Malformed-but-harmless pickles cost time to interpret: every operation on the zip
        # form, loading and scanning on the others, and the 4-million-opcode one loaded once.
        ops = ["load"] if name == "memo_flood" else (SLOW_ZIP_OPS if name in SLOW_PAYLOADS else None)
        cases.append(Case(f"zip_{name}", write(f"zip_{name}.pt", torch_zip(pkl)), error, scan=scan,
                          cli=name in cli_payloads, tags=["pickle"], ops=ops))
        if name == "memo_flood":
            continue
        ops = ["load", "scan"] if name in SLOW_PAYLOADS else None
        cases.append(Case(f"legacy_{name}", write(f"legacy_{name}.pt", torch_legacy(pkl, [])), error,
                          scan=scan, tags=["pickle"], ops=ops))
        cases.append(Case(f"raw_{name}", write(f"raw_{name}.pkl", pkl), r"", scan=scan, tags=["pickle", "raw"],
                          ops=ops))
    cases += tensor_cases(write)
    cases += zip_cases(write)
    cases += legacy_cases(canary, write)
    valid = write_valid_files(os.path.join(directory, "valid"))
    cases += header_cases(valid, write)
    return cases, valid


# --- the subprocess worker ------------------------------------------------------------------

MODEL_OPS = ("load", "inspect", "inspect_unknown", "scan", "convert:gguf", "convert:safetensors", "convert:bin")
TOKENIZER_OPS = ("tokenizer", "tokenizer_to_bin", "scan")


def default_ops(case) -> list:
    if case.ops:
        return list(case.ops)
    if case.kind == "tokenizer":
        return list(TOKENIZER_OPS) + (["spm"] if case.path.endswith(".model") else [])
    return list(MODEL_OPS)


def _run_op(op, path, outdir):
    import wconv
    from wconv.convert.load import load_tokenizer
    from wconv.convert.save import convert, write_tokenizer_bin
    from wconv.inspect.scan import scan_path

    if op == "load":
        model = wconv.load(path)
        for t in model.tensors.values():
            t.raw()
        return {"n_tensors": len(model.tensors)}
    if op in ("inspect", "inspect_unknown"):
        report = wconv.inspect(path, allow_unknown_globals=op == "inspect_unknown")
        return {"json_chars": len(json.dumps(report))}
    if op == "scan":
        res = scan_path(path)
        return {"verdict": res["verdict"], "reasons": res["reasons"], "json_chars": len(json.dumps(res))}
    if op.startswith("convert:"):
        fmt = op.split(":")[1]
        out = os.path.join(outdir, "out." + fmt)
        try:
            convert(path, out, quiet=True)
        finally:
            left = os.listdir(outdir)
            for f in left:
                os.unlink(os.path.join(outdir, f))
        return {"left": left}
    if op == "tokenizer":
        tok = load_tokenizer(path)
        return {"n_tokens": len(tok.tokens)}
    if op == "probe_limit":  # proves the address-space limit is in force
        return {"allocated": len(bytearray(4 << 30))}
    if op == "spm":
        from wconv.formats import sentencepiece

        return {"n_tokens": len(sentencepiece.read(path).tokens)}
    if op == "tokenizer_to_bin":
        out = os.path.join(outdir, "tokenizer.bin")
        try:
            write_tokenizer_bin(path, out)
        finally:
            left = os.listdir(outdir)
            for f in left:
                os.unlink(os.path.join(outdir, f))
        return {"left": left}
    raise ValueError(op)


def _truncations(job, outdir):
    """Every prefix of a valid file: each must fail with WconvError or read back consistently."""
    import hashlib

    import wconv
    from wconv.convert.load import load_tokenizer

    data = open(job["path"], "rb").read()
    ext = os.path.splitext(job["path"])[1]
    path = os.path.join(outdir, "cut" + ext)

    def digest():
        if job["kind"] == "tokenizer":
            return [bytes(t).hex() for t in load_tokenizer(path).tokens]
        if job["kind"] == "torch":  # the container reader itself (the tree is not a model)
            from wconv.formats.torch_file import open_torch_file, walk_tensors

            tensors = dict(walk_tensors(open_torch_file(path).root))
        else:
            tensors = wconv.load(path).tensors
        return {n: hashlib.sha256(t.raw().tobytes()).hexdigest() for n, t in tensors.items()}

    with open(path, "wb") as f:
        f.write(data)
    full = digest()
    bad = []
    ok = 0
    for cut in range(len(data)):
        with open(path, "wb") as f:
            f.write(data[:cut])
        try:
            got = digest()
        except wconv.WconvError as e:
            if "\n" in str(e) or not str(e).startswith(path):
                bad.append((cut, "badmessage", str(e)))
            continue
        except Exception as e:  # noqa: BLE001 - the point is to catch anything else
            bad.append((cut, type(e).__name__, str(e)[:300]))
            continue
        consistent = (got == full[:len(got)]) if job["kind"] == "tokenizer" else (
            all(full.get(k) == v for k, v in got.items()))
        ok += 1
        if not consistent:
            bad.append((cut, "inconsistent", ""))
    os.unlink(path)
    return {"n": len(data), "ok": ok, "bad": bad[:20]}


def worker(jobs_path: str) -> None:
    import copyreg
    import resource
    import time

    with open(jobs_path) as f:
        spec = json.load(f)
    limit = spec.get("rlimit_as")
    if limit:
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    for code in EXTENSIONS:  # registered extensions must not change what wconv does
        func = _ext_func(code)
        copyreg.add_extension(func.__module__, func.__name__, code)
    import wconv  # noqa: F401  (only now: under the limit)
    from wconv.errors import WconvError

    outdir = spec["outdir"]
    os.makedirs(outdir, exist_ok=True)
    results = []
    for job in spec["jobs"]:
        if job.get("truncate"):
            t0 = time.perf_counter()
            res = _truncations(job, outdir)
            results.append({"name": job["name"], "op": "truncate", "seconds": time.perf_counter() - t0, **res})
            continue
        for op in job["ops"]:
            t0 = time.perf_counter()
            rec = {"name": job["name"], "op": op}
            try:
                rec.update(outcome="ok", **_run_op(op, job["path"], outdir))
            except WconvError as e:
                rec.update(outcome="error", type=type(e).__name__, message=str(e))
            except BaseException as e:  # noqa: BLE001
                rec.update(outcome="crash", type=type(e).__name__, message=" ".join(str(e).split())[:500])
            rec["seconds"] = time.perf_counter() - t0
            if op.startswith("convert") or op == "tokenizer_to_bin":
                rec["left"] = rec.get("left") or os.listdir(outdir)
            results.append(rec)
    print(json.dumps(results))


if __name__ == "__main__":
    import sys

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    worker(sys.argv[1])
