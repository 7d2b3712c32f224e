"""GGUF (llama.cpp's model format): lazy reading, streaming writing with gguf-py.

Reading uses our own bounds-checked header parser rather than gguf-py's
GGUFReader, for two reasons: GGUFReader builds a numpy object per array element
(3.7 s for GPT-2's 50k-token vocab, far longer for Llama 3's 128k tokens + 280k
merges), and it trusts declared lengths (a huge array count makes it loop over
empty reads). Here every count, length and offset is checked against the bytes
actually present before anything is allocated. Tensors are lazy views of maps of
their own byte ranges (wconv.mapped), so a streaming writer keeps about one tensor
resident. The tests check this parser against GGUFReader.
GGUF v1 (2023 pre-release) is refused; v2 and v3 (both byte orders) read.

Writing: header, metadata and tensor infos first, then tensor data one tensor at a
time (GGUFWriter's `add_tensor_info` / `write_tensor_data` path), so only one
tensor is in memory. Element types: see wconv/quant.py (1-D tensors F32; `dtype`
f32|f16|bf16 for every matrix; a quantised `dtype` (q4_0 ... q8_0 and the k-quant mixes
q2_k ... q6_k) gives each tensor the type llama-quantize gives it (wconv.quant_mix),
with `output_tensor_type` / `token_embedding_type` / `pure` as its overrides; default
keeps each matrix's type).
Architectures: each family's `gguf_metadata` (wconv/arch/; llama, qwen2, gemma, gpt2).
A tied classifier is written without `output.weight` (llama.cpp then reuses
`token_embd.weight`). A model without a tokenizer gets `tokenizer.ggml.model =
"no_vocab"` plus `{arch}.vocab_size`: llama.cpp then loads it with placeholder
tokens (token ids in, logits out; no text).
"""
from __future__ import annotations

import functools
import mmap
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .. import arch, quant, quant_mix, stream
from ..arch.family import Problems
from ..errors import FormatError, UnsupportedError, UsageError
from ..mapped import map_array
from ..model import Config, Model, Stored, Tokenizer
from ..notes import emit as emit_notes
from ..progress import progress
from ..tensor import FileSpan, LazyTensor
from . import gguf_set

GGUF_MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4  # GGML_MAX_DIMS
NO_VOCAB = ("no_vocab", "none")  # llama.cpp's names for "this model has no tokenizer"

# GGUF metadata value types: id -> (name, numpy dtype code or None for string/array).
_VALUE_TYPES = {0: ("UINT8", "u1"), 1: ("INT8", "i1"), 2: ("UINT16", "u2"), 3: ("INT16", "i2"),
                4: ("UINT32", "u4"), 5: ("INT32", "i4"), 6: ("FLOAT32", "f4"), 7: ("BOOL", "u1"),
                8: ("STRING", None), 9: ("ARRAY", None), 10: ("UINT64", "u8"), 11: ("INT64", "i8"),
                12: ("FLOAT64", "f8")}
_STRING, _ARRAY, _FLOAT32, _BOOL = 8, 9, 6, 7
_SUMMARY_ITEMS = 8  # long arrays in Model.metadata: first items + length
_MAX_STRING_SHOWN = 1000


# ----------------------------------------------------------------------------- reading
@dataclass
class TensorInfo:
    name: str
    dims: tuple  # GGML order: dims[0] is the row length
    dtype: object  # wconv DType
    offset: int  # absolute file offset of the data
    nbytes: int


@dataclass
class Header:
    version: int
    endian: str  # "<" or ">"
    alignment: int
    data_offset: int
    kv: dict = field(default_factory=dict)  # key -> value (strings as bytes, arrays as lists)
    kv_types: dict = field(default_factory=dict)  # key -> (type name, element type name or None)
    tensors: list = field(default_factory=list)  # TensorInfo, in file order
    kv_spans: dict = field(default_factory=dict)  # key -> (start, end) byte range of its whole entry
    info_span: tuple = (0, 0)  # byte range of the tensor infos (between the metadata and the padding)


class _Cursor:
    """Bounds-checked reads from a byte buffer; any overrun is a FormatError naming the item."""

    def __init__(self, buf, path, endian):
        self.buf, self.path, self.end, self.pos, self.e = buf, path, len(buf), 0, endian

    def need(self, n: int, what: str):
        if n < 0 or self.pos + n > self.end:
            raise FormatError(self.path, f"truncated GGUF: {what} needs {n} bytes at offset {self.pos}, "
                                         f"file has {self.end}")

    def unpack(self, fmt: str, what: str):
        size = struct.calcsize(fmt)
        self.need(size, what)
        vals = struct.unpack_from(self.e + fmt, self.buf, self.pos)
        self.pos += size
        return vals if len(vals) != 1 else vals[0]

    def string(self, what: str) -> bytes:
        n = self.unpack("Q", what + " length")
        self.need(n, what)
        s = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        return s

    def scalars(self, code: str, count: int, what: str) -> np.ndarray:
        dt = np.dtype(code).newbyteorder(self.e)
        self.need(count * dt.itemsize, what)
        arr = np.frombuffer(self.buf, dtype=dt, count=count, offset=self.pos)
        self.pos += count * dt.itemsize
        return arr

    def value(self, vtype: int, what: str):
        """(value, element type) of one metadata value; strings stay bytes."""
        if vtype not in _VALUE_TYPES:
            raise FormatError(self.path, f"{what} has unknown GGUF value type {vtype}")
        code = _VALUE_TYPES[vtype][1]
        if code is not None:
            v = self.scalars(code, 1, what)[0].item()
            return (bool(v) if vtype == _BOOL else v), None
        if vtype == _STRING:
            return self.string(what), None
        sub = self.unpack("I", what + " element type")
        count = self.unpack("Q", what + " element count")
        if sub not in _VALUE_TYPES:
            raise FormatError(self.path, f"{what} has unknown GGUF array element type {sub}")
        if sub == _ARRAY:
            raise FormatError(self.path, f"{what} is an array of arrays, which GGUF does not allow")
        sub_code = _VALUE_TYPES[sub][1]
        min_size = np.dtype(sub_code).itemsize if sub_code else 8  # a string is at least its length field
        if count * min_size > self.end - self.pos:
            raise FormatError(self.path, f"{what} declares {count} elements but only "
                                         f"{self.end - self.pos} bytes remain in the file")
        if sub == _STRING:
            return [self.string(f"{what}[{i}]") for i in range(count)], sub
        arr = self.scalars(sub_code, count, what)
        return (arr.astype(bool) if sub == _BOOL else arr).tolist(), sub


def parse_header(path: str, buf) -> Header:
    """Parse and check a GGUF header held in `buf` (bytes-like, e.g. a memoryview of an mmap)."""
    if len(buf) < 8 or bytes(buf[:4]) != GGUF_MAGIC:
        raise FormatError(path, "not a GGUF file (missing 'GGUF' magic)")
    (version,) = struct.unpack_from("<I", buf, 4)
    endian = "<"
    if version & 0xFFFF == 0 and version != 0:  # written on a big-endian machine
        endian = ">"
        (version,) = struct.unpack_from(">I", buf, 4)
    if version == 1:
        raise UnsupportedError(path, "GGUF version 1 (the 2023 pre-release format) is not supported; "
                                     "re-create the file with a current llama.cpp or gguf-py")
    if version not in (2, 3):
        raise UnsupportedError(path, f"unknown GGUF version {version} (wconv reads versions 2 and 3)")
    c = _Cursor(buf, path, endian)
    c.pos = 8
    n_tensors, n_kv = c.unpack("QQ", "tensor and metadata counts")
    if n_kv * 13 > c.end - c.pos:  # smallest entry: 8-byte key length + 1-byte key + type + 1-byte value
        raise FormatError(path, f"header declares {n_kv} metadata entries, more than the file can hold")
    h = Header(version, endian, DEFAULT_ALIGNMENT, 0)
    for i in range(n_kv):
        start = c.pos
        key = c.string(f"metadata key #{i}").decode("utf-8", "replace")
        if key in h.kv:
            raise FormatError(path, f"duplicate metadata key {key!r}")
        vtype = c.unpack("I", f"type of {key!r}")
        h.kv[key], sub = c.value(vtype, f"metadata {key!r}")
        h.kv_types[key] = (_VALUE_TYPES[vtype][0], _VALUE_TYPES[sub][0] if sub is not None else None)
        h.kv_spans[key] = (start, c.pos)
    if "general.alignment" in h.kv:
        h.alignment = h.kv["general.alignment"]
        if h.kv_types["general.alignment"][0] != "UINT32" or h.alignment == 0 or h.alignment & (h.alignment - 1):
            raise FormatError(path, f"general.alignment {h.alignment!r} is not a UINT32 power of two")
    if n_tensors * 25 > c.end - c.pos:  # smallest tensor info: 8+1 name, 4 n_dims, 4 type, 8 offset
        raise FormatError(path, f"header declares {n_tensors} tensors, more than the file can hold")
    infos = []
    info_start = c.pos
    for i in range(n_tensors):
        name = c.string(f"tensor #{i} name").decode("utf-8", "replace")
        n_dims = c.unpack("I", f"tensor {name!r} n_dims")
        if n_dims > MAX_DIMS:
            raise FormatError(path, f"tensor {name!r} has {n_dims} dimensions (GGML allows at most {MAX_DIMS})")
        dims = tuple(int(d) for d in c.scalars("u8", n_dims, f"tensor {name!r} dims"))
        ttype = c.unpack("I", f"tensor {name!r} type")
        offset = c.unpack("Q", f"tensor {name!r} offset")
        try:
            dt = quant.ggml_dtype(ttype)
        except (ValueError, KeyError):
            raise FormatError(path, f"tensor {name!r} has unknown GGML type {ttype}") from None
        n_el = 1
        for d in dims:
            n_el *= d
        if n_el >= 1 << 62:
            raise FormatError(path, f"tensor {name!r} declares an impossible shape {list(dims)}")
        if dt.quantized and dims and dims[0] % dt.block:
            raise FormatError(path, f"tensor {name!r} row length {dims[0]} is not a multiple of the "
                                    f"{dt.name} block size {dt.block}")
        if offset % h.alignment:
            raise FormatError(path, f"tensor {name!r} data offset {offset} is not aligned to {h.alignment}")
        infos.append((name, dims, dt, offset, dt.nbytes(n_el)))
    h.info_span = (info_start, c.pos)
    h.data_offset = -(-c.pos // h.alignment) * h.alignment if n_tensors else c.pos
    names = set()
    for name, dims, dt, offset, nbytes in infos:
        if name in names:
            raise FormatError(path, f"duplicate tensor name {name!r}")
        names.add(name)
        start = h.data_offset + offset
        if start + nbytes > c.end:
            raise FormatError(path, f"truncated GGUF: tensor {name!r} ({dt.name} {list(dims)}) needs bytes "
                                    f"up to {start + nbytes}, file has {c.end}")
        h.tensors.append(TensorInfo(name, dims, dt, start, nbytes))
    _check_no_overlap(path, h.tensors)
    return h


def _check_no_overlap(path: str, tensors: list) -> None:
    """Two tensors sharing bytes: corrupt or crafted (llama.cpp itself refuses any layout other
    than one tensor after another)."""
    spans = sorted((t.offset, t.offset + t.nbytes, t.name) for t in tensors if t.nbytes)
    for (b0, e0, n0), (b1, e1, n1) in zip(spans, spans[1:]):
        if b1 < e0:
            raise FormatError(path, f"tensors {n0!r} and {n1!r} overlap in the data section")


def _f32(v) -> float:
    """A float32 value as the shortest decimal that round-trips (1e-05, not 9.999999747378752e-06)."""
    return float(str(np.float32(v)))


def _text(v):
    """A metadata value for display: bytes decoded, float32 shown at its own precision."""
    if isinstance(v, bytes):
        return v.decode("utf-8", "replace")
    if isinstance(v, list):
        return [_text(x) for x in v]
    return v


def _summary(value, types):
    """JSON-friendly metadata value: long arrays and strings shortened for display."""
    kind, element = types
    if kind == "FLOAT32":
        return _f32(value)
    if isinstance(value, list):
        long = len(value) > 2 * _SUMMARY_ITEMS
        head = value[:_SUMMARY_ITEMS] if long else value
        head = [_f32(v) for v in head] if element == "FLOAT32" else _text(head)
        return {"array_length": len(value), "element_type": element, "first": head} if long else head
    value = _text(value)
    if isinstance(value, str) and len(value) > _MAX_STRING_SHOWN:
        return value[:_MAX_STRING_SHOWN] + f"... ({len(value)} characters)"
    return value


def _tensor_loader(path: str, size: int, info: TensorInfo, endian: str):
    dt = info.dtype
    what = f"tensor {info.name!r}"

    def load():
        # A map of this tensor's bytes only, unmapped when the caller drops the array.
        if dt.quantized:
            return map_array(path, info.offset, info.nbytes, np.uint8, file_size=size, what=what)
        storage = dt.storage.newbyteorder(endian)
        arr = map_array(path, info.offset, info.nbytes, storage, file_size=size, what=what)
        arr = arr.reshape(tuple(reversed(info.dims)))
        return arr if storage.isnative else arr.astype(storage.newbyteorder("="))
    return load


def _tokenizer(kv: dict, path: str) -> Tokenizer | None:
    kind = kv.get("tokenizer.ggml.model")
    if kind is None:
        return None
    kind = _text(kind)
    if kind in NO_VOCAB:
        return None
    tokens = kv.get("tokenizer.ggml.tokens")
    if not isinstance(tokens, list) or not all(isinstance(t, bytes) for t in tokens[:1]):
        raise FormatError(path, f"tokenizer.ggml.model is {kind!r} but tokenizer.ggml.tokens is missing")

    def per_token(key, kind):
        vals = kv.get(key)
        if vals is None:
            return None
        if not isinstance(vals, list) or len(vals) != len(tokens):
            raise FormatError(path, f"{key} has {len(vals) if isinstance(vals, list) else 'no'} entries, "
                                    f"expected one per token ({len(tokens)})")
        if vals and not isinstance(vals[0], (int, float)):
            raise FormatError(path, f"{key} holds {type(vals[0]).__name__} values, expected numbers")
        return [kind(v) for v in vals]

    def scalar(key, kind=int):
        v = kv.get(key)
        return None if v is None or isinstance(v, (list, bytes)) else kind(v)

    merges = kv.get("tokenizer.ggml.merges")
    pre, template = kv.get("tokenizer.ggml.pre"), kv.get("tokenizer.chat_template")
    return Tokenizer(
        model=kind, tokens=tokens,
        scores=per_token("tokenizer.ggml.scores", float), token_types=per_token("tokenizer.ggml.token_type", int),
        merges=_text(merges) if isinstance(merges, list) else None,
        bos_id=scalar("tokenizer.ggml.bos_token_id"), eos_id=scalar("tokenizer.ggml.eos_token_id"),
        unk_id=scalar("tokenizer.ggml.unknown_token_id"), pad_id=scalar("tokenizer.ggml.padding_token_id"),
        sep_id=scalar("tokenizer.ggml.seperator_token_id"), eot_id=scalar("tokenizer.ggml.eot_token_id"),
        eom_id=scalar("tokenizer.ggml.eom_token_id"),
        add_bos=scalar("tokenizer.ggml.add_bos_token", bool), add_eos=scalar("tokenizer.ggml.add_eos_token", bool),
        add_space_prefix=scalar("tokenizer.ggml.add_space_prefix", bool),
        pre=_text(pre) if isinstance(pre, bytes) else None,
        chat_template=_text(template) if isinstance(template, bytes) else None,
        kind="gguf", source=path, files=[path])


def _config(kv: dict, arch_name: str, tensors: dict, path: str, strict: bool):
    """(Config, problems) from the GGUF metadata of a family wconv implements, through wconv.arch."""
    problems = Problems(path, strict)
    fam = arch.by_gguf(arch_name)
    if fam is None:
        problems.tensor_problem(UnsupportedError, f"GGUF architecture {arch_name!r} is not supported; wconv "
                                                  f"converts {', '.join(sorted({f.gguf_arch for f in arch.FAMILIES.values()}))}")
        return None, problems
    prefix = arch_name + "."
    odd = sorted(k[len(prefix):] for k in kv if k.startswith(prefix) and k[len(prefix):] not in fam.gguf_keys)
    if odd:
        problems.tensor_problem(UnsupportedError, f"GGUF metadata {', '.join(prefix + k for k in odd[:4])} changes "
                                                  f"the {fam.title} model in ways wconv does not implement")
        return None, problems
    cfg = fam.gguf_config(kv, tensors, problems)
    if tensors:
        fam.gguf_absorb(cfg, tensors, problems)
    return cfg, problems


def read_header(path) -> tuple[Header, int]:
    """(parsed and checked Header, file size) of a GGUF file; reads no tensor data."""
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < 8:
                raise FormatError(path, "not a GGUF file (too short)")
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except OSError as e:
        raise FormatError(path, f"cannot read: {e.strerror or e}") from None
    view = memoryview(mm)
    h = parse_header(path, view)
    # The header values are copies: this map of the whole file is not needed past here.
    view.release()
    mm.close()
    return h, size


def read_set(path, *, whole_set: bool = True) -> list:
    """[(part path, Header, file size)]: the file itself, or every part of the split set it is the
    first part of (wconv.formats.gguf_set: all parts present, split keys and tensor total as llama.cpp
    checks them). whole_set=False reads just the file (edit, verify: one part as stored)."""
    path = os.fspath(path)
    h, size = read_header(path)
    if not whole_set or gguf_set.declared_count(h) <= 1:
        return [(path, h, size)]
    paths = gguf_set.part_paths(path, h)
    parts = [(path, h, size)] + [(p, *read_header(p)) for p in paths[1:]]
    gguf_set.check_parts(paths, [ph for _, ph, _ in parts])
    return parts


def read(path, *, strict: bool = True, whole_set: bool = True) -> Model:
    """Open a GGUF file lazily: config and tokenizer from metadata, tensors as mmap views.

    The first part of a split set is read as the whole model (its metadata, every part's
    tensors); whole_set=False reads one file only.
    strict=False (inspect) shows files of architectures or settings wconv does not implement
    as arch "unknown" with the reason in metadata["warnings"], instead of refusing them.
    """
    path = os.fspath(path)
    parts = read_set(path, whole_set=whole_set)
    h = parts[0][1]
    arch_name = _text(h.kv.get("general.architecture", b""))
    if not isinstance(arch_name, str):
        raise FormatError(path, "general.architecture is not a string")
    tokenizer = _tokenizer(h.kv, path)

    tensors, file_of = {}, {}
    for part, ph, size in parts:
        base = os.path.basename(part)
        for info in ph.tensors:
            if info.dtype.quantized and ph.endian == ">":
                raise UnsupportedError(part, f"tensor {info.name}: quantised tensors in big-endian GGUF are not "
                                             "supported")
            tensors[info.name] = LazyTensor(info.name, info.dtype, tuple(reversed(info.dims)),
                                            _tensor_loader(part, size, info, ph.endian),
                                            source=f"{base}:{info.name}", storage_key=(part, info.offset),
                                            span=FileSpan(part, info.offset, info.nbytes, size) if ph.endian == "<" else None)
            file_of[info.name] = part

    metadata = {"GGUF.version": h.version, "GGUF.tensor_count": len(tensors), "GGUF.kv_count": len(h.kv),
                "_input_files": [p for p, _, _ in parts],
                "_arch_source": f"declared by GGUF general.architecture ({arch_name!r})"}
    if len(parts) > 1:
        metadata["GGUF.split_files"] = [p for p, _, _ in parts]
    metadata.update({k: _summary(v, h.kv_types[k]) for k, v in h.kv.items()})
    metadata["GGUF.alignment"] = h.alignment
    metadata["GGUF.byte_order"] = "big" if h.endian == ">" else "little"
    if not tensors:
        metadata["vocab_only"] = True
    in_file = dict(tensors)  # before _config folds GGUF-only tensors (rope_freqs) into the config
    cfg, problems = _config(h.kv, arch_name, tensors, path, strict and bool(tensors))
    if cfg is None or problems.layout:
        cfg = Config(arch="unknown", norm_eps=0.0, rope_theta=0.0)
    if problems.layout or problems.other:
        metadata["warnings"] = problems.layout + problems.other
    if problems.notes:
        metadata["notes"] = problems.notes
    known = cfg.arch != "unknown"
    stored = [Stored(file_of[n], n, t, n if known and n in tensors else None,
                     "" if n in tensors or not known else "folded into the config's RoPE scaling")
              for n, t in in_file.items()]
    return Model(config=cfg, tensors=tensors, tokenizer=tokenizer, metadata=metadata,
                 source_format=f"gguf-v{h.version}", source_layout="gguf", path=path, stored=stored)


# ----------------------------------------------------------------------------- writing
KV_CODES = {  # struct codes of GGUF scalar value types
   "UINT8": "B", "INT8": "b", "UINT16": "H", "INT16": "h", "UINT32": "I", "INT32": "i", "UINT64": "Q",
          "INT64": "q", "FLOAT32": "f", "FLOAT64": "d", "BOOL": "?"}


def _kv_type_id(name: str) -> int:
    from gguf import GGUFValueType

    return int(GGUFValueType[name])


def pack_kv(key: str, kind: str, element, value, e: str) -> bytes:
    """One metadata entry as GGUF stores it: key, value type (GGUFValueType name), value; `element`
    is an ARRAY's element type; `e` the byte order ("<" or ">"). For writers that patch headers
    without gguf-py's writer (edit, split), which cannot keep tensor data in place."""
    k = key.encode("utf-8")
    return b"".join((struct.pack(e + "Q", len(k)), k, struct.pack(e + "I", _kv_type_id(kind)),
                     pack_value(kind, element, value, e)))


def pack_value(kind: str, element, value, e: str) -> bytes:
    """A metadata value without its key and type: arrays in whole-array numpy/bytes operations."""
    if kind == "ARRAY":
        head = struct.pack(e + "IQ", _kv_type_id(element), len(value))
        if element == "STRING":
            return head + _pack_strings(value, e)
        return head + np.asarray(value, dtype=np.dtype(KV_CODES[element]).newbyteorder(e)).tobytes()
    if kind == "STRING":
        b = value if isinstance(value, bytes) else value.encode("utf-8")
        return struct.pack(e + "Q", len(b)) + b
    return struct.pack(e + KV_CODES[kind], value)


def _pack_strings(items, e: str) -> bytes:
    """GGUF strings back to back (u64 length, bytes), without a Python call per item and field."""
    data = [s if isinstance(s, bytes) else s.encode("utf-8") for s in items]
    lengths = np.fromiter(map(len, data), dtype=np.dtype(e + "u8"), count=len(data)).tobytes()
    parts = [b""] * (2 * len(data))
    parts[0::2] = [lengths[i:i + 8] for i in range(0, len(lengths), 8)]
    parts[1::2] = data
    return b"".join(parts)


@functools.cache
def _writer_class():
    """gguf-py's GGUFWriter, packing typed arrays (the vocabulary: ~100k tokens, scores, types,
    merges) with pack_value: gguf-py packs them one struct call per element, 0.1 s a conversion."""
    from gguf import GGUFEndian, GGUFValueType, GGUFWriter

    class Writer(GGUFWriter):
        def _pack_val(self, val, vtype, add_vtype, sub_type=None):
            if vtype != GGUFValueType.ARRAY or sub_type is None or len(val) == 0:
                return super()._pack_val(val, vtype, add_vtype, sub_type)
            e = "<" if self.endianess == GGUFEndian.LITTLE else ">"
            return (struct.pack(e + "I", vtype) if add_vtype else b"") + pack_value("ARRAY", sub_type.name, val, e)

        def add_typed_array(self, key: str, element: str, val) -> None:
            if len(val):
                self.add_key_value(key, val, GGUFValueType.ARRAY, GGUFValueType[element])

    return Writer


def check_writable(model: Model, where: str) -> tuple[list, int]:
    """Check tensors and shapes against what llama.cpp's loader for the family accepts; (names, n_ctx)."""
    cfg = model.config
    fam = arch.get(cfg.arch)
    if fam is None:
        raise UnsupportedError(where, f"cannot write architecture {cfg.arch!r} (wconv writes "
                                      f"{', '.join(arch.FAMILIES)})")
    if not model.tensors:
        raise UnsupportedError(where, "the model has no tensors (a vocab-only file?); nothing to convert")
    why = fam.gguf_refusal(cfg)
    if why:
        raise UnsupportedError(where, why)
    if not (cfg.dim and cfg.n_heads and cfg.n_layers):
        raise UsageError(where, f"incomplete hyperparameters: dim={cfg.dim} n_heads={cfg.n_heads} "
                                f"n_layers={cfg.n_layers}")
    names = fam.expected_names(cfg)
    missing = [n for n in names if n not in model.tensors]
    if missing:
        raise UsageError(where, f"model lacks {len(missing)} tensor(s) the {cfg.arch} format needs, "
                                f"e.g. {', '.join(missing[:3])}")
    extra = [n for n in model.tensors if n not in names]
    if extra:
        raise UnsupportedError(where, f"tensor(s) {', '.join(extra[:3])} are not part of the {cfg.arch} "
                                      "architecture wconv writes; refusing to drop them silently")
    for n in names:
        want = fam.shape(n, cfg)
        got = model.tensors[n].shape
        if got != tuple(want):
            raise UsageError(where, f"tensor {n} has shape {list(got)}, but the hyperparameters "
                                    f"(dim {cfg.dim}, heads {cfg.n_heads}/{cfg.n_kv_heads}, vocab "
                                    f"{cfg.vocab_size}, hidden {cfg.hidden_dim}) require {list(want)}")
    return names, fam


def check_options(model: Model, out, *, dtype: str | None = None, max_seq_len: int | None = None,
                  output_tensor_type: str | None = None, token_embedding_type: str | None = None,
                  pure: bool = False, **_writer_only) -> None:
    """Every check `write` makes before its first byte, run before the temporary output exists:
    what the model cannot be written as names the input, what the options ask for names OUT.
    (vocab_only / metadata_overrides change nothing that can fail here.)"""
    where = model.path or os.fspath(out)
    if max_seq_len is not None and max_seq_len <= 0:
        raise UsageError(out, f"--max-seq-len must be positive, got {max_seq_len}")
    if max_seq_len is not None and max_seq_len > (1 << 32) - 1:
        raise UsageError(out, f"--max-seq-len {max_seq_len} is too large (GGUF's context length is a uint32)")
    cfg = model.config
    if cfg.arch == "gpt2" and max_seq_len and "position_embd.weight" in model.tensors:
        rows = model.tensors["position_embd.weight"].shape[0]
        if max_seq_len != rows:
            raise UsageError(out, f"GPT-2 context length is fixed by position_embd ({rows} rows); "
                                  f"cannot write --max-seq-len {max_seq_len}")
    plan(model, where, dtype=dtype, max_seq_len=max_seq_len,  # shapes, context length, per-tensor types
         overrides=mix_overrides(out, dtype, output_tensor_type, token_embedding_type, pure))
    tok = model.tokenizer
    if tok is not None:
        check_vocab_fits(tok, model.tensors["token_embd.weight"].shape[0], where)
        if tok.model == "gpt2" and not tok.merges:
            raise UsageError(tok.source or where, "the byte-level BPE vocabulary has no merges, without which "
                                                  "llama.cpp cannot load it")


def check_vocab_fits(tok: Tokenizer, n_vocab: int, where) -> None:
    """A vocabulary larger than the embedding belongs to another model: refused, naming both sizes."""
    n = len(tok.tokens)
    if n > n_vocab:
        raise UsageError(tok.source or where, f"tokenizer has {n} tokens but the model {where} has {n_vocab} "
                                              "embedding rows; it belongs to another model")
    for key, arr in (("scores", tok.scores), ("token_types", tok.token_types)):
        if arr is not None and len(arr) != n:
            raise UsageError(tok.source or where, f"tokenizer {key} has {len(arr)} entries for {n} tokens")


def _add_hparams(w, fam, cfg: Config, n_ctx: int, n_vocab: int):
    for key, value, kind in fam.gguf_metadata(cfg, n_ctx, n_vocab):
        full = f"{fam.gguf_arch}.{key}"
        if kind == "UINT32":
            w.add_uint32(full, int(value))
        elif kind == "FLOAT32":
            w.add_float32(full, float(value))
        elif kind == "STRING":
            w.add_string(full, str(value))
        else:
            raise ValueError(f"GGUF value type {kind} for {full}")


def _add_vocab(w, model: Model, n_vocab: int, where: str, notes: list):
    from gguf import Keys

    tok = model.tokenizer
    if tok is None:
        w.add_tokenizer_model(NO_VOCAB[0])
        notes.append("no tokenizer: wrote tokenizer.ggml.model = 'no_vocab' (llama.cpp loads it and "
                     "evaluates token ids, but cannot tokenise text); pass --tokenizer to embed one")
        return
    tokens, scores, types = _padded_vocab(tok, n_vocab, where, notes)
    w.add_tokenizer_model(tok.model)
    pre = _pre_name(tok, model, where, notes)
    if pre is not None:
        w.add_tokenizer_pre(pre)
    w.add_typed_array(Keys.Tokenizer.LIST, "STRING", tokens)
    if scores is not None:
        w.add_typed_array(Keys.Tokenizer.SCORES, "FLOAT32", scores)
    if types is not None:
        w.add_typed_array(Keys.Tokenizer.TOKEN_TYPE, "INT32", types)
    if tok.merges:
        w.add_typed_array(Keys.Tokenizer.MERGES, "STRING",
                          [m if isinstance(m, str) else bytes(m).decode("utf-8") for m in tok.merges])
    elif tok.model == "gpt2":
        raise UsageError(where, "the byte-level BPE vocabulary has no merges, without which llama.cpp cannot load it")
    for key, value in (("bos_token_id", tok.bos_id), ("eos_token_id", tok.eos_id), ("unknown_token_id", tok.unk_id),
                       ("padding_token_id", tok.pad_id), ("seperator_token_id", tok.sep_id),
                       ("eot_token_id", tok.eot_id), ("eom_token_id", tok.eom_id)):
        if value is not None and 0 <= int(value) < n_vocab:  # (llama.cpp spells "seperator")
            w.add_uint32(f"tokenizer.ggml.{key}", int(value))
    for key, value in (("add_bos_token", tok.add_bos), ("add_eos_token", tok.add_eos),
                       ("add_space_prefix", tok.add_space_prefix)):
        if value is not None:
            w.add_bool(f"tokenizer.ggml.{key}", bool(value))
    if tok.chat_template:
        w.add_string("tokenizer.chat_template", tok.chat_template)


def _padded_vocab(tok: Tokenizer, n_vocab: int, where: str, notes: list) -> tuple:
    """tokens, scores, types; [PAD{id}] UNUSED tokens fill embedding rows past the vocabulary
    (HF checkpoints round vocab_size up: nanoGPT 50304, Phi-3 32064), as llama.cpp's converter does."""
    tokens = [t if isinstance(t, bytes) else str(t).encode("utf-8") for t in tok.tokens]
    n = len(tokens)
    if n > n_vocab:
        raise UsageError(where, f"tokenizer has {n} tokens but the model's vocabulary is {n_vocab} "
                                f"(embedding rows); it belongs to another model")
    for key, arr in (("scores", tok.scores), ("token_types", tok.token_types)):
        if arr is not None and len(arr) != n:
            raise UsageError(where, f"tokenizer {key} has {len(arr)} entries for {n} tokens")
    scores = [float(s) for s in tok.scores] if tok.scores is not None else None
    types = [int(t) for t in tok.token_types] if tok.token_types is not None else None
    if n < n_vocab:
        notes.append(f"tokenizer has {n} tokens, model vocabulary {n_vocab}: padded with [PAD{{id}}] tokens")
        tokens += [f"[PAD{i}]".encode() for i in range(n, n_vocab)]
        scores = scores + [-1000.0] * (n_vocab - n) if scores is not None else None
        types = (types if types is not None else [1] * n) + [5] * (n_vocab - n)  # 5: TokenType.UNUSED
    return tokens, scores, types


def _pre_name(tok: Tokenizer, model: Model, where: str, notes: list):
    """tokenizer.ggml.pre: the vocabulary's own (its reader identified it), else what the source said."""
    pre = tok.pre or model.metadata.get("tokenizer.ggml.pre")
    if isinstance(pre, str) and pre:
        return pre
    if tok.model == "llama":
        return "default"
    notes.append("the vocabulary names no pre-tokenizer (tokenizer.ggml.pre); llama.cpp will use its "
                 "'default' one, as it did for the source")
    return None


def _model_name(model: Model) -> str:
    name = model.metadata.get("general.name")
    if isinstance(name, str) and name:
        return name
    if model.path:
        return os.path.splitext(os.path.basename(os.path.normpath(model.path)))[0] or "model"
    return "model"


@dataclass
class WritePlan:
    """What write() will write: the tensors in order, each one's GGUF type, and the notes."""
    fam: object
    n_ctx: int
    n_vocab: int
    tensors: dict  # name -> LazyTensor, in file order (GGUF-only tensors such as rope_freqs first)
    types: object  # quant.TypePlan
    notes: list  # what GGUF cannot hold of the config (the type fallbacks are in types.notes)

    def file_type(self, model: Model, dtype) -> int:
        keep_type = dtype is None and isinstance(model.metadata.get("general.file_type"), int)
        return model.metadata["general.file_type"] if keep_type else self.types.file_type()


def mix_overrides(out, dtype, output_tensor_type=None, token_embedding_type=None, pure=False):
    """llama-quantize's overrides as a quant_mix.Overrides (None when none is given); they need a
    quantised --dtype (UsageError naming OUT otherwise) and known type names."""
    if output_tensor_type is None and token_embedding_type is None and not pure:
        return None
    given = [o for o, v in (("--output-tensor-type", output_tensor_type), ("--token-embedding-type",
                                                                          token_embedding_type), ("--pure", pure)) if v]
    if not quant.is_mix(dtype):
        raise UsageError(out, f"{', '.join(given)} apply to a quantised --dtype "
                              f"({', '.join(quant_mix.QUANTISED_FTYPES)}), not {dtype or 'the default (keep each type)'}")
    for option, value in (("--output-tensor-type", output_tensor_type), ("--token-embedding-type",
                                                                         token_embedding_type)):
        if value is not None and str(value).upper() not in quant_mix.BLOCK:
            raise UsageError(out, f"{option} {value}: unknown type; choose one of "
                                  f"{', '.join(t.lower() for t in quant_mix.BLOCK)}")
    return quant_mix.Overrides(output_tensor_type, token_embedding_type, bool(pure))


def mix_hparams(model: Model, fam) -> "quant_mix.HParams":
    """What llama-quantize reads of the hyperparameters: block count, heads, KV heads, architecture."""
    cfg = model.config
    return quant_mix.HParams(n_layers=cfg.n_layers, n_heads=cfg.n_heads, n_kv_heads=cfg.n_kv_heads or cfg.n_heads,
                             arch=fam.gguf_arch)


def plan(model: Model, where, *, dtype: str | None = None, max_seq_len: int | None = None,
         overrides=None) -> WritePlan:
    """Check `model` against what llama.cpp loads and decide every tensor's type; writes nothing.
    overrides: quant_mix.Overrides for a quantised dtype (see mix_overrides)."""
    cfg = model.config
    names, fam = check_writable(model, where)
    if max_seq_len is not None and max_seq_len <= 0:  # not "unset": 0 would silently mean the default
        raise UsageError(where, f"max_seq_len must be positive, got {max_seq_len}")
    n_ctx = int(max_seq_len or cfg.max_seq_len or 0)
    if cfg.arch == "gpt2":
        rows = model.tensors["position_embd.weight"].shape[0]
        if max_seq_len and max_seq_len != rows:
            raise UsageError(where, f"GPT-2 context length is fixed by position_embd ({rows} rows); "
                                    f"cannot write --max-seq-len {max_seq_len}")
        n_ctx = rows
    if n_ctx <= 0:
        raise UsageError(where, "the model does not say its context length; pass --max-seq-len")
    n_vocab = model.tensors["token_embd.weight"].shape[0]
    extra = fam.gguf_extra_tensors(cfg)  # e.g. llama3 RoPE factors, which llama.cpp reads as a tensor
    tensors = {**extra, **{n: model.tensors[n] for n in names}}
    try:
        if quant.is_mix(dtype):
            types = quant.plan_mix(list(tensors.values()), dtype, mix_hparams(model, fam),
                                   can_hold=quant.has_ggml_type, overrides=overrides)
        else:
            types = quant.plan_types(list(tensors.values()), dtype, can_hold=quant.has_ggml_type)
    except ValueError as e:
        raise UsageError(where, str(e)) from None
    return WritePlan(fam, n_ctx, n_vocab, tensors, types, fam.gguf_cannot_hold(cfg))


def _add_overrides(w, overrides: dict) -> None:
    """general.* keys given by --metadata (wconv.gguf_meta): key -> (GGUF type name, value)."""
    adders = {"STRING": w.add_string, "INT32": w.add_int32, "UINT32": w.add_uint32, "FLOAT32": w.add_float32,
              "ARRAY": w.add_array}
    for key, (kind, value) in overrides.items():
        if key != "general.name":
            adders[kind](key, value)


def write(model: Model, tmp_path, *, quiet: bool = False, dtype: str | None = None,
          max_seq_len: int | None = None, vocab_only: bool = False, metadata_overrides: dict | None = None,
          threads: int | None = None, output_tensor_type: str | None = None,
          token_embedding_type: str | None = None, pure: bool = False) -> list:
    """Write `model` as GGUF v3 to `tmp_path`, streaming the tensor data (wconv.stream).

    vocab_only: hyperparameters and vocabulary, no tensors (llama.cpp's vocab_only load).
    metadata_overrides: general.* keys to add (key -> (type, value); general.name replaces the name).
    output_tensor_type / token_embedding_type / pure: llama-quantize's overrides (quantised dtype only).
    Returns the list of notes (type fallbacks, padding...), also printed to stderr.
    """
    where = model.path or os.fspath(tmp_path)
    cfg = model.config
    p = plan(model, where, dtype=dtype, max_seq_len=max_seq_len,
             overrides=mix_overrides(where, dtype, output_tensor_type, token_embedding_type, pure))
    fam, n_ctx, n_vocab = p.fam, p.n_ctx, p.n_vocab
    if vocab_only and model.tokenizer is None:
        raise UsageError(where, "--vocab-only: the model has no vocabulary to write; pass --tokenizer")
    notes = ([] if vocab_only else list(p.types.notes)) + p.notes
    tensors = {} if vocab_only else p.tensors
    names = list(tensors)
    overrides = metadata_overrides or {}

    w = _writer_class()(None, fam.gguf_arch)
    w.add_name(overrides["general.name"][1] if "general.name" in overrides else _model_name(model))
    _add_overrides(w, overrides)
    w.add_file_type(p.file_type(model, dtype))
    w.add_quantization_version(2)  # GGML_QNT_VERSION: current Q4_0/Q8_0 block layouts
    _add_hparams(w, fam, cfg, n_ctx, n_vocab)
    _add_vocab(w, model, n_vocab, where, notes)
    for n in names:
        t, dt = tensors[n], p.types.types[n]
        w.add_tensor_info(n, t.shape, np.dtype(np.float32), dt.nbytes(t.n_elements), raw_dtype=quant.ggml_type(dt))
    w.write_header_to_file(Path(tmp_path))
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    alignment = w.data_alignment
    w.close()
    # gguf-py wrote header, metadata and tensor infos; the data section is ours: each tensor at
    # the offset its info declares (padded to the alignment), copied or encoded piecewise.
    jobs = [(tensors[n], p.types.types[n]) for n in names]
    with open(tmp_path, "r+b") as f, \
            progress(sum(t.nbytes for t, _ in jobs), "writing GGUF", quiet=quiet) as bar:
        f.seek(0, os.SEEK_END)
        results = stream.write_tensors(f, jobs, threads=threads, before=lambda i: stream.pad(f, alignment),
                                       after=lambda i: (stream.pad(f, alignment),
                                                        bar.update(jobs[i][0].nbytes, names[i])))
    notes += [quant.overflow_note(n) for n, r in zip(names, results) if r.overflowed]
    emit_notes(where, notes)
    return notes
