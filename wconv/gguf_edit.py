"""`wconv edit`: change GGUF metadata without re-converting, at the cost of about one `cp`.

The output is the input's header with the edited key/value entries, followed by the input's
tensor infos and its whole data section, unchanged: tensor offsets are relative to the data
section and the alignment is kept, so one kernel copy of that section
(`wconv.mapped.copy_range`: copy_file_range, which a filesystem may turn into a reflink)
carries every tensor. Entries that are not edited are copied byte for byte too, so the GGUF
version, byte order, key order and any value wconv does not interpret survive unchanged.
(gguf-py's GGUFWriter is not used for the header: it always writes a fresh v3 header with
recomputed tensor offsets and refuses empty arrays, which real files contain; its type enum
is.) The result is re-read before it replaces anything (`wconv.atomic.atomic_path`, also
for `in_place`).

Values: `--set KEY=VALUE` keeps the GGUF type of an existing key (strings are taken
verbatim; numbers, booleans and JSON arrays are parsed for that type); a new key gets the
type llama.cpp reads it as (wconv.gguf_keys), else one inferred from the text like gguf-py
does (integer -> INT32, decimal -> FLOAT32, true/false -> BOOL, JSON array, anything else a
string); `KEY:TYPE=VALUE` says the type (u8 i8 u16 i16 u32 i32 u64 i64 f32 f64 bool str, or
`TYPE[]` for an array). Edits llama.cpp would not load - a type it does not read the key as,
a changed shape-determining or structural key, a deleted required key, an unknown
pre-tokenizer or RoPE scaling type, a token id outside the vocabulary, vocabulary arrays of
the wrong length - are refused with the reason.
"""
from __future__ import annotations

import json
import math
import os
import re
import struct
import time

import numpy as np

from . import gguf_keys as K
from .atomic import atomic_path
from .errors import FormatError, UsageError, WconvError
from .formats import gguf_io
from .mapped import copy_range, read_bytes, read_whole
from .progress import warn

MAX_TEMPLATE_BYTES = 16 << 20

# CLI type names -> GGUFValueType names; struct codes per scalar type.
TYPE_NAMES = {"u8": "UINT8", "i8": "INT8", "u16": "UINT16", "i16": "INT16", "u32": "UINT32", "i32": "INT32",
              "u64": "UINT64", "i64": "INT64", "f32": "FLOAT32", "f64": "FLOAT64", "bool": "BOOL", "str": "STRING"}
_SHORT = {v: k for k, v in TYPE_NAMES.items()}
_INT_RANGES = {t: (np.iinfo(np.dtype(c)).min, np.iinfo(np.dtype(c)).max)
               for t, c in (("UINT8", "u1"), ("INT8", "i1"), ("UINT16", "u2"), ("INT16", "i2"), ("UINT32", "u4"),
                            ("INT32", "i4"), ("UINT64", "u8"), ("INT64", "i8"))}


def _shown(kind, element) -> str:
    if kind == "ARRAY":
        return f"ARRAY of {element or 'nothing'}"
    return kind


# --- the edit description ----------------------------------------------------------------

def parse_assignment(text: str):
    """'KEY[:TYPE]=VALUE' -> (key, (type, element type) or None, value text)."""
    if "=" not in text:
        raise UsageError(None, f"--set {text!r}: expected KEY=VALUE (or KEY:TYPE=VALUE)")
    left, value = text.split("=", 1)
    key, typ = left, None
    if ":" in left:
        head, spec = left.rsplit(":", 1)
        name = spec[:-2] if spec.endswith("[]") else spec
        if name in TYPE_NAMES:
            key = head
            typ = ("ARRAY", TYPE_NAMES[name]) if spec.endswith("[]") else (TYPE_NAMES[name], None)
        elif re.fullmatch(r"[a-z0-9_]+(\[\])?", spec):
            raise UsageError(None, f"--set {text!r}: unknown type {spec!r} (choose from "
                                   f"{', '.join(TYPE_NAMES)}, or TYPE[] for an array)")
    key = key.strip()
    if not key:
        raise UsageError(None, f"--set {text!r}: empty key")
    return key, typ, value


def _scalar(value, kind: str, key: str):
    """A Python value of GGUF scalar type `kind` from text (or, in arrays, a JSON value)."""
    bad = UsageError(None, f"{key}: {value!r} is not a valid {_SHORT.get(kind, kind)} value")
    if kind == "STRING":
        if not isinstance(value, str):
            raise bad
        return value
    if kind == "BOOL":
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.strip().lower() in ("true", "1", "yes")
        raise bad
    if kind in _INT_RANGES:
        if isinstance(value, bool):
            raise bad
        if isinstance(value, str):
            try:
                value = int(value.strip(), 0)
            except ValueError:
                raise bad from None
        if not isinstance(value, int):
            raise bad
        lo, hi = _INT_RANGES[kind]
        if not lo <= value <= hi:
            raise UsageError(None, f"{key}: {value} does not fit in {kind} ({lo}..{hi})")
        return value
    if kind in ("FLOAT32", "FLOAT64"):
        if isinstance(value, bool):
            raise bad
        try:
            value = float(value.strip() if isinstance(value, str) else value)
        except (TypeError, ValueError):
            raise bad from None
        if kind == "FLOAT32" and math.isfinite(value):
            with np.errstate(over="ignore"):
                if not np.isfinite(np.float32(value)):
                    raise UsageError(None, f"{key}: {value} is beyond the FLOAT32 range")
            value = float(np.float32(value))
        return value
    raise bad


def _value(text: str, typ, key: str):
    kind, element = typ
    if kind != "ARRAY":
        return _scalar(text, kind, key)
    try:
        items = json.loads(text)
    except ValueError:
        raise UsageError(None, f"{key}: an array value must be a JSON array, e.g. [1, 2] or [\"a\", \"b\"]") from None
    if not isinstance(items, list):
        raise UsageError(None, f"{key}: an array value must be a JSON array")
    if element is None:
        element = _inferred_element(items, key)
    return [_scalar(v, element, key) for v in items], element


def _inferred_element(items: list, key: str) -> str:
    if not items:
        raise UsageError(None, f"{key}: an empty array needs an element type, e.g. {key}:i32[]=[]")
    if all(isinstance(v, bool) for v in items):
        return "BOOL"
    if all(isinstance(v, int) and not isinstance(v, bool) for v in items):
        return "INT32" if all(-2**31 <= v < 2**31 for v in items) else "INT64"
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in items):
        return "FLOAT32"
    if all(isinstance(v, str) for v in items):
        return "STRING"
    raise UsageError(None, f"{key}: array elements must all be numbers, all booleans or all strings")


def _inferred_type(text: str, key: str):
    """gguf-py's convention for a value of unknown type: int -> INT32, float -> FLOAT32, ..."""
    try:
        v = json.loads(text)
    except ValueError:
        return ("STRING", None)
    if isinstance(v, bool):
        return ("BOOL", None)
    if isinstance(v, int):
        return ("INT32", None) if -2**31 <= v < 2**31 else ("INT64", None)
    if isinstance(v, float):
        return ("FLOAT32", None)
    if isinstance(v, list):
        return ("ARRAY", _inferred_element(v, key))
    return ("STRING", None)


def _known_names() -> list:
    """Regexes of every key name gguf-py's constants define ({arch}, {name}... as wildcards)."""
    import inspect

    from gguf import Keys

    out = []
    for group in vars(Keys).values():
        if inspect.isclass(group):
            for name, v in vars(group).items():
                if isinstance(v, str) and not name.startswith("_"):
                    out.append(re.compile(re.sub(r"\\\{[a-z_]+\\\}", r"[^.]+", re.escape(v)) + "$"))
    return out


# --- serialisation -----------------------------------------------------------------------

# --- checks ------------------------------------------------------------------------------

def _same(old, new) -> bool:
    return (old.decode("utf-8", "replace") if isinstance(old, bytes) else old) == new if not isinstance(old, list) \
        else [x.decode("utf-8", "replace") if isinstance(x, bytes) else x for x in old] == new


def _check(src: str, h, arch: str, changes: dict, deleted: list, notes: list) -> None:
    """Refuse edits llama.cpp would not load; `changes` maps key -> (kind, element, value)."""
    for key in deleted:
        if key in K.LOCKED:
            raise UsageError(src, f"cannot delete {key}: {K.LOCKED[key]}")
        if K.is_required(key, arch) or K.is_structural(key, arch):
            raise UsageError(src, f"cannot delete {key}: llama.cpp needs it to load a {arch or 'GGUF'} model")
        if key == "tokenizer.ggml.tokens" and _text(h.kv.get("tokenizer.ggml.model")) not in K.NO_VOCAB:
            raise UsageError(src, "cannot delete tokenizer.ggml.tokens: llama.cpp loads no model without its vocabulary")
    for key, (kind, element, value) in changes.items():
        old = h.kv_types.get(key)
        same_value = old == (kind, element) and _same(h.kv[key], value)
        if key in K.LOCKED and not same_value:
            raise UsageError(src, f"cannot change {key}: {K.LOCKED[key]}")
        accepted = K.expected_types(key, arch)
        if accepted is not None and (kind, element) not in accepted:
            want = " or ".join(_shown(*t) for t in accepted)
            raise UsageError(src, f"llama.cpp reads {key} as {want}; storing it as {_shown(kind, element)} would "
                                  "make it refuse to load the file (pass a type, e.g. "
                                  f"{key}:{_SHORT.get(accepted[0][0], 'u32')}=..., or leave the type out)")
        if K.is_structural(key, arch) and not same_value:
            shown = "absent" if old is None else _text(h.kv[key])
            raise UsageError(src, f"cannot change {key} (now {shown}): the tensor shapes depend on it, and "
                                  "llama.cpp would fail to load the file")
    _check_values(src, h, arch, changes, deleted, notes)


def _text(v):
    return v.decode("utf-8", "replace") if isinstance(v, bytes) else v


def _after(h, changes, deleted, key):
    if key in deleted:
        return None
    if key in changes:
        return changes[key][2]
    v = h.kv.get(key)
    return [_text(x) for x in v] if isinstance(v, list) else _text(v)


def _check_values(src, h, arch, changes, deleted, notes):
    def get(key):
        return _after(h, changes, deleted, key)

    model = get("tokenizer.ggml.model")
    tokens = get("tokenizer.ggml.tokens")
    if "tokenizer.ggml.tokens" in changes and isinstance(h.kv.get("tokenizer.ggml.tokens"), list) \
            and len(tokens) != len(h.kv["tokenizer.ggml.tokens"]):
        raise UsageError(src, f"tokenizer.ggml.tokens would have {len(tokens)} tokens instead of "
                              f"{len(h.kv['tokenizer.ggml.tokens'])}: the embedding matrix has a row per token")
    n_tokens = len(tokens) if isinstance(tokens, list) else get(f"{arch}.vocab_size")
    for key in ("tokenizer.ggml.scores", "tokenizer.ggml.token_type"):
        v = get(key)
        if key in changes and isinstance(tokens, list) and len(v) < len(tokens):
            raise UsageError(src, f"{key} would have {len(v)} entries for {len(tokens)} tokens; llama.cpp needs one "
                                  "per token")
    for key in K.TOKEN_ID_KEYS:
        if key in changes and isinstance(n_tokens, int) and not changes[key][2] < n_tokens:
            raise UsageError(src, f"{key} {changes[key][2]} is not a token id: the vocabulary has {n_tokens} tokens")
    pre = get("tokenizer.ggml.pre")
    if "tokenizer.ggml.pre" in changes and model in K.BPE_MODELS and pre not in K.PRE_TOKENIZERS:
        raise UsageError(src, f"llama.cpp does not know the pre-tokenizer {pre!r} and would refuse to load the file")
    if "tokenizer.ggml.pre" in changes and model not in K.BPE_MODELS:
        notes.append(f"tokenizer.ggml.pre is only read for BPE vocabularies; this one is {model!r}")
    key = f"{arch}.rope.scaling.type"
    if key in changes and changes[key][2] not in K.ROPE_SCALING_TYPES:
        raise UsageError(src, f"{key} must be one of {', '.join(K.ROPE_SCALING_TYPES)} (llama.cpp aborts on "
                              f"{changes[key][2]!r})")


# --- the edit ----------------------------------------------------------------------------

def _resolve(src, h, arch, assignments, notes, known) -> dict:
    """key -> (kind, element, value) for every --set, types decided as the module says."""
    changes = {}
    for item in assignments:
        try:
            key, typ, value = _resolve_one(h, arch, item, notes, known)
        except UsageError as e:
            raise UsageError(src, e.message) if e.path is None else e
        changes[key] = value
    return changes


def _resolve_one(h, arch, item, notes, known):
    """(key, type, (kind, element, value)) of one --set."""
    key, typ, text = parse_assignment(item) if isinstance(item, str) else item
    if typ is None:
        if key in h.kv_types:
            typ = h.kv_types[key]
        else:
            accepted = K.expected_types(key, arch)
            if accepted:
                wants_array = text.lstrip().startswith("[")
                typ = next((t for t in accepted if (t[0] == "ARRAY") == wants_array), accepted[0])
            else:
                typ = _inferred_type(text, key)
                if not any(p.match(key) for p in known):
                    notes.append(f"{key} is not a key llama.cpp or gguf-py define (a typo?); stored as "
                                 f"{_shown(*typ)}")
    value = _value(text, typ, key)
    kind, element = typ
    if kind == "ARRAY":
        value, element = value
    return key, typ, (kind, element, value)


def edit_gguf(src, dst=None, *, set=(), delete=(), chat_template=None, in_place: bool = False,
              force: bool = False) -> dict:
    """Write `dst` (or, in place, `src` atomically): `src` with metadata edited.

    set: "KEY[:TYPE]=VALUE" strings (or (key, (type, element) | None, text) tuples); delete: keys;
    chat_template: a file whose text becomes tokenizer.chat_template. Returns what was done.
    """
    src = os.fspath(src)
    if in_place == (dst is not None):
        raise UsageError(src, "give either an output file or --in-place" if not in_place else
                              "--in-place rewrites the input: give no output file")
    out = src if in_place else os.fspath(dst)
    if not (set or delete or chat_template):
        raise UsageError(src, "nothing to edit: give --set, --delete or --chat-template")
    started = time.monotonic()
    from .convert.load import sniff

    if not os.path.isfile(src):
        raise FormatError(src, "no such file")
    if sniff(src) != "gguf":
        raise FormatError(src, "not a GGUF file; wconv edit changes GGUF metadata only")
    h, size = gguf_io.read_header(src)
    arch = _text(h.kv.get("general.architecture", b""))
    notes: list = []
    assignments = list(set)
    if chat_template is not None:
        raw = read_whole(chat_template, max_bytes=MAX_TEMPLATE_BYTES, what="chat template")
        try:
            assignments.append(("tokenizer.chat_template", ("STRING", None), raw.decode("utf-8")))
        except UnicodeDecodeError:
            raise FormatError(chat_template, "chat template is not UTF-8 text") from None
    changes = _resolve(src, h, arch, assignments, notes, _known_names())
    deleted = list(dict.fromkeys(delete))
    for key in deleted:
        if key in changes:
            raise UsageError(src, f"{key} is both set and deleted")
        if key not in h.kv:
            raise UsageError(src, f"cannot delete {key}: the file has no such key")
    _check(src, h, arch, changes, deleted, notes)

    head = read_bytes(src, 0, h.info_span[1], file_size=size, what="GGUF header")
    entries = []
    for key, (start, end) in h.kv_spans.items():
        if key in deleted:
            continue
        entries.append(gguf_io.pack_kv(key, *changes[key], h.endian) if key in changes else head[start:end])
    added = [k for k in changes if k not in h.kv]
    entries += [gguf_io.pack_kv(k, *changes[k], h.endian) for k in added]
    prefix = b"".join([gguf_io.GGUF_MAGIC, struct.pack(h.endian + "IQQ", h.version, len(h.tensors), len(entries)),
                       *entries, head[h.info_span[0]:h.info_span[1]]])
    if h.tensors:
        prefix += b"\0" * (-len(prefix) % h.alignment)
    data_bytes = size - h.data_offset

    with atomic_path(out, force=force or in_place, inputs=() if in_place else [src]) as tmp:
        with open(tmp, "wb") as f:
            f.write(prefix)
            copy_range(src, h.data_offset, data_bytes, f, file_size=size, what="GGUF tensor data")
        _check_written(src, tmp, out, h, len(prefix))
    for note in notes:
        warn(src, note)
    return {"input": src, "output": out, "in_place": in_place,
            "changed": [k for k in changes if k in h.kv], "added": added, "deleted": deleted,
            "bytes_copied": data_bytes, "seconds": round(time.monotonic() - started, 3), "notes": notes}


def _check_written(src: str, tmp: str, out: str, before, new_data_offset: int) -> None:
    """Re-read the result: it parses (metadata, vocabulary), and every tensor is where it was."""
    try:
        tensors = gguf_io.read(tmp, strict=False, whole_set=False).tensors
        where = {name: t.storage_key[1] for name, t in tensors.items()}
    except WconvError as e:
        try:
            gguf_io.read(src, strict=False, whole_set=False)
        except WconvError:  # the input itself does not read as a model: compare the headers only
            after, _ = gguf_io.read_header(tmp)
            tensors = {t.name: t for t in after.tensors}
            where = {t.name: t.offset for t in after.tensors}
        else:
            raise UsageError(out, f"the edited file would not read back ({e.message}); nothing written") from None
    moved = [t.name for t in before.tensors if t.name not in where
             or where[t.name] - new_data_offset != t.offset - before.data_offset]
    if moved or len(tensors) != len(before.tensors):
        raise FormatError(out, "the edited file's tensors do not match the input's; nothing written")


def format_edit(result: dict) -> str:
    parts = [f"{len(result[k])} {k}" for k in ("changed", "added", "deleted") if result[k]]
    return (f"{result['output']}: {', '.join(parts)} key(s); {result['bytes_copied']:,} bytes of tensor data "
            f"copied in {result['seconds']:.2f} s")
