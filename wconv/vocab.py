"""Tokenizer files: recognise them by content, find them beside a model, load them into one Tokenizer.

Kinds (`sniff`): sentencepiece `tokenizer.model` (protobuf), Meta's tiktoken `tokenizer.model`
(base64 + rank lines), HF `tokenizer.json`, GPT-2 `vocab.json`/`encoder.json` (+ its merges file,
`merges.txt`/`vocab.bpe`, found beside it by content), llama2.c `tokenizer.bin`, and the
vocabulary inside a GGUF. `tokenizer_config.json` and `generation_config.json` in the same
directory add special tokens, add_bos/add_eos, the chat template and end-of-generation ids.
A file of any other kind given as a tokenizer is refused saying what it is.
"""
from __future__ import annotations

import collections
import functools
import math
import os
import struct

from .errors import FormatError, UnsupportedError, WconvError
from .model import Config, Model, Tokenizer
from .sniff import WHAT
from .sniff import sniff as sniff_model

SNIFF_BYTES = 4096
MAX_SIDE_FILE = 64 << 20  # files beside a model larger than this are not tokenizers
MAX_FILES_BESIDE = 256  # a model directory holds tens of files; do not read through a huge one
TOKENIZER_KINDS = ("sentencepiece", "tiktoken", "hf-tokenizer-json", "gpt2-vocab-json", "bpe-merges",
                   "llama2c-tokenizer")
READS = ("sentencepiece or tiktoken tokenizer.model, tokenizer.json, vocab.json/encoder.json + merges, "
         "llama2.c tokenizer.bin, or a GGUF with a vocabulary")


# ----------------------------------------------------------------------------- recognising
def _head(path, n=SNIFF_BYTES) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(n)
    except IsADirectoryError:
        return None
    except OSError as e:
        raise FormatError(path, f"cannot read: {e.strerror or e}") from None


def _json_kind(path) -> str:
    st = os.stat(path)
    if st.st_size > MAX_SIDE_FILE:
        return "json"
    return _json_kind_of(os.path.abspath(path), st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev)


@functools.lru_cache(maxsize=64)
def _json_kind_of(path, size, mtime_ns, ctime_ns, inode, device) -> str:
    # Kept per file version (the stat fields are the key; ctime moves even when a rewrite sets
    # mtime back): one load sniffs a directory's files more than once (tokenizer, then its config
    # files), and a 1.5 MB tokenizer.json takes 50-80 ms to parse each time.
    from .formats import gpt2_vocab, hf_tokenizer

    try:
        obj = hf_tokenizer.read_json(path, "JSON file")
    except WconvError:
        return "json"
    if hf_tokenizer.is_tokenizer_json(obj):
        return "hf-tokenizer-json"
    if gpt2_vocab.is_vocab_json(obj):
        return "gpt2-vocab-json"
    if hf_tokenizer.is_tokenizer_config(obj):
        return "hf-tokenizer-config"
    if hf_tokenizer.is_generation_config(obj):
        return "hf-generation-config"
    return "json"


def _records_parse(head: bytes, max_len: int) -> bool:
    """The (f32 score, i32 length, bytes) records of a tokenizer.bin fit within `head`."""
    pos = 4
    while pos + 8 <= len(head):
        score, n = struct.unpack_from("<fi", head, pos)
        if not (0 <= n <= max_len and math.isfinite(score)):
            return False
        pos += 8 + n
    return len(head) >= 12


def _looks_like_llama2c_tokenizer(path, head: bytes) -> bool:
    from .formats import llama2c_tokenizer

    if len(head) < 12 or os.path.getsize(path) > MAX_SIDE_FILE:
        return False
    max_len = int.from_bytes(head[:4], "little")
    if not 0 < max_len <= 1024:
        return False
    if not _records_parse(head, max_len):  # the records in the head must parse before the whole file is tried
        return False
    try:
        llama2c_tokenizer.read(path)
    except WconvError:
        return False
    return True


_JSON_KINDS = {"hf-tokenizer-json", "gpt2-vocab-json", "hf-tokenizer-config", "hf-generation-config"}


def sniff(path, wanted=None) -> str:
    """The kind of file `path` is, from its content (a key of WHAT).

    wanted: a set of kinds; a file of another kind may then be reported as "other" without the
    costlier checks (a full JSON parse, a whole tokenizer.bin) that only those kinds need.
    """
    from .formats import gpt2_vocab, tiktoken_bpe

    path = os.fspath(path)
    head = _head(path)
    if head is None:
        return "directory"
    if not head:
        return "empty"
    if head.startswith(b"GGUF"):
        return "gguf"
    is_json = False
    if head.lstrip()[:1] == b"{" and (wanted is None or wanted & _JSON_KINDS):
        kind = _json_kind(path)
        if kind != "json":
            return kind
        is_json = True
    if tiktoken_bpe.looks_like(head):
        return "tiktoken"
    if gpt2_vocab.looks_like_merges(head):
        return "bpe-merges"
    # protobuf: field 1 (pieces, length-delimited) whose message starts with its own field 1 (the piece).
    if head[:1] == b"\x0a" and b"\x0a" in head[2:4]:
        return "sentencepiece"
    if wanted is not None and "llama2c-tokenizer" not in wanted:
        return "other"
    if _looks_like_llama2c_tokenizer(path, head):
        return "llama2c-tokenizer"
    if wanted is not None:
        return "other"
    kind = sniff_model(path)
    if kind in ("unknown", "sentencepiece"):  # (load.sniff's guess from a .model name is no answer here)
        return "json" if is_json else "unknown"
    return kind


# ----------------------------------------------------------------------------- loading
def load_tokenizer(path) -> Tokenizer:
    """A Tokenizer from any tokenizer file (kinds above), with its directory's HF config files."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FormatError(path, "tokenizer file not found")
    kind = sniff(path)
    head = _head(path) if kind == "unknown" else b""
    if len(head) >= 4 and (0 < int.from_bytes(head[:4], "little") <= 1 << 16 or _records_parse(head, 1 << 16)):
        # its header or records look like a tokenizer.bin's: one beyond the sniffing bounds, or a damaged one
        from .formats import llama2c_tokenizer

        try:
            return llama2c_tokenizer.read(path)
        except FormatError as e:
            raise FormatError(path, f"is not a tokenizer file wconv knows (it reads {READS}); read as a "
                                    f"llama2.c tokenizer.bin: {e.message}") from None
    if kind not in TOKENIZER_KINDS and kind != "gguf":
        hint = ""
        if kind in ("hf-tokenizer-config", "hf-generation-config"):
            hint = "; give the tokenizer.json or tokenizer.model of the same directory"
        what = WHAT.get(kind, kind) if kind in ("unknown", "json") else f"{WHAT.get(kind, kind)}, not a tokenizer"
        raise UnsupportedError(path, f"is {what} (wconv reads {READS}){hint}")
    return _load(path, kind)


def _load(path, kind) -> Tokenizer:
    from .formats import gpt2_vocab, hf_tokenizer, llama2c_tokenizer, sentencepiece, tiktoken_bpe

    directory = os.path.dirname(os.path.abspath(path))
    if kind == "gguf":
        return _gguf_vocab(path)
    if kind == "llama2c-tokenizer":
        return llama2c_tokenizer.read(path)
    if kind == "sentencepiece":
        tok = sentencepiece.read(path)
    elif kind == "tiktoken":
        tok = tiktoken_bpe.read(path)
    elif kind == "hf-tokenizer-json":
        tok = hf_tokenizer.read(path)
    else:
        vocab_path, merges_path = _gpt2_pair(path, kind, directory)
        tok = gpt2_vocab.read(vocab_path, merges_path)
    _apply_side_files(tok, directory)
    return tok


def _gguf_vocab(path) -> Tokenizer:
    from .formats import gguf_io

    model = gguf_io.read(path)
    if model.tokenizer is None:
        what = "GGUF model" if model.tensors else "GGUF file"
        raise UnsupportedError(path, f"is a {what} without a vocabulary (tokenizer.ggml.model "
                                     f"{model.metadata.get('tokenizer.ggml.model', 'absent')!r}), not a tokenizer")
    return model.tokenizer


def _files_beside(directory, skip=()) -> list:
    try:
        names = sorted(os.listdir(directory))
    except OSError:
        return []
    out = []
    for name in names:
        p = os.path.join(directory, name)
        if name.startswith(".") or os.path.abspath(p) in skip or not os.path.isfile(p):
            continue
        try:
            if os.path.getsize(p) > MAX_SIDE_FILE:
                continue
        except OSError:
            continue
        out.append(p)
    return out


def _kinds_beside(directory, wanted, skip=()) -> dict:
    """kind -> [paths] for the files of `directory` of the `wanted` kinds (content-sniffed;
    unreadable ones skipped; at most MAX_FILES_BESIDE files looked at)."""
    found = {}
    for p in _files_beside(directory, skip)[:MAX_FILES_BESIDE]:
        try:
            kind = sniff(p, wanted)
        except WconvError:
            continue
        found.setdefault(kind, []).append(p)
    return found


def _gpt2_pair(path, kind, directory) -> tuple:
    """(vocab.json, merges file): the one given and its partner, found beside it by content."""
    want = "bpe-merges" if kind == "gpt2-vocab-json" else "gpt2-vocab-json"
    partners = _kinds_beside(directory, {want}, skip={os.path.abspath(path)}).get(want, [])
    if not partners:
        other = "merges file (merges.txt / vocab.bpe)" if want == "bpe-merges" else "vocab.json / encoder.json"
        raise FormatError(path, f"is {WHAT[kind]}; its {other} was not found beside it")
    if len(partners) > 1:
        raise UnsupportedError(path, f"several candidates for its partner file beside it "
                                     f"({', '.join(os.path.basename(p) for p in partners[:4])}); keep one")
    return (path, partners[0]) if kind == "gpt2-vocab-json" else (partners[0], path)


def _apply_side_files(tok: Tokenizer, directory) -> None:
    """tokenizer_config.json / generation_config.json / chat_template.jinja from the tokenizer's directory."""
    from .formats import hf_tokenizer

    kinds = _kinds_beside(directory, {"hf-tokenizer-config", "hf-generation-config"},
                          skip={os.path.abspath(f) for f in tok.files})
    config = _one(kinds.get("hf-tokenizer-config", []), "tokenizer_config.json")
    if config:
        hf_tokenizer.apply_config(tok, hf_tokenizer.read_json(config, "tokenizer_config.json"), config,
                                  added_tokens_decoder=tok.kind == "sentencepiece")
    generation = _one(kinds.get("hf-generation-config", []), "generation_config.json")
    if generation:
        hf_tokenizer.apply_generation_config(tok, hf_tokenizer.read_json(generation, "generation_config.json"),
                                             generation)
    jinja = os.path.join(directory, "chat_template.jinja")  # HF's fixed name; its content is free Jinja
    if tok.chat_template is None and os.path.isfile(jinja) and os.path.getsize(jinja) <= MAX_SIDE_FILE:
        try:
            with open(jinja, encoding="utf-8") as f:
                tok.chat_template = f.read()
            tok.files.append(jinja)
        except (OSError, UnicodeDecodeError) as e:
            raise FormatError(jinja, f"cannot read the chat template: {e}") from None
    if tok.model == "llama" and tok.kind == "sentencepiece" and tok.bos_id is not None:
        # sentencepiece / Meta Llama convention (and llama.cpp's default for these vocabularies)
        tok.add_bos = True if tok.add_bos is None else tok.add_bos
        tok.add_eos = False if tok.add_eos is None else tok.add_eos


def _one(paths, usual_name):
    if len(paths) > 1:  # two of a kind: the one with HF's usual name, else none (ambiguous)
        named = [p for p in paths if os.path.basename(p) == usual_name]
        return named[0] if named else None
    return paths[0] if paths else None


# Which kinds a model's own directory may hold, best first (a sentencepiece model carries exact scores).
_BESIDE_PRIORITY = ("sentencepiece", "hf-tokenizer-json", "tiktoken", "gpt2-vocab-json", "llama2c-tokenizer")
_PARENT_KINDS = ("sentencepiece", "tiktoken")  # Meta's downloads: tokenizer.model beside llama-2-7b/


def find_tokenizer_beside(path):
    """The tokenizer shipped next to a checkpoint, else None.

    A file input: its directory. A directory input: the directory itself, then (sentencepiece or
    tiktoken tokenizer.model only) its parent, where Meta's downloads keep it.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        directory = os.path.abspath(path)
        places = ((directory, _BESIDE_PRIORITY), (os.path.dirname(directory), _PARENT_KINDS))
    else:
        places = ((os.path.dirname(os.path.abspath(path)), _BESIDE_PRIORITY),)
    for place, allowed in places:
        kinds = _kinds_beside(place, set(allowed) | {"bpe-merges"}, skip={os.path.abspath(path)})
        for kind in allowed:
            paths = kinds.get(kind, [])
            if kind == "gpt2-vocab-json" and not kinds.get("bpe-merges"):
                continue
            if len(paths) > 1:
                raise UnsupportedError(place, f"several {WHAT[kind]} files ({', '.join(map(os.path.basename, paths))})"
                                              "; pass --tokenizer")
            if paths:
                tok = _load(paths[0], kind)
                tok.found_beside = True
                return tok
    return None


# ----------------------------------------------------------------------------- reporting
def summary(tok: Tokenizer | None) -> dict | None:
    """The `tokenizer` section of `wconv inspect --json` (docs/inspect-json.md)."""
    if tok is None:
        return None
    types = tok.token_types or []

    def named(i):
        if not isinstance(i, int) or not 0 <= i < len(tok.tokens):
            return None
        return {"id": i, "text": bytes(tok.tokens[i]).decode("utf-8", "replace")}

    counts = {}
    names = {1: "normal", 2: "unknown", 3: "control", 4: "user_defined", 5: "unused", 6: "byte"}
    for t, n in collections.Counter(types).items():  # (first-seen order, as a loop would give)
        counts[names.get(t, str(t))] = counts.get(names.get(t, str(t)), 0) + n
    control = [i for i, t in enumerate(types) if t == 3]
    normal = [i for i, t in enumerate(types) if t == 1][:8] if types else list(range(min(8, len(tok.tokens))))
    return {
        "model": tok.model, "kind": tok.kind, "n_tokens": len(tok.tokens),
        "bos_id": tok.bos_id, "eos_id": tok.eos_id, "unk_id": tok.unk_id, "pad_id": tok.pad_id,
        "n_merges": len(tok.merges) if tok.merges else 0, "source": tok.source,
        "pre": tok.pre, "token_types": counts,
        "special": {role: named(getattr(tok, f"{role}_id"))
                    for role in ("bos", "eos", "unk", "pad", "sep", "eot", "eom")
                    if getattr(tok, f"{role}_id") is not None},
        "control_tokens": [named(i) for i in control[:16]], "n_control_tokens": len(control),
        "sample_tokens": [named(i) for i in normal],  # the first few ordinary tokens
        "eog_ids": tok.eog_ids, "add_bos": tok.add_bos, "add_eos": tok.add_eos,
        "add_space_prefix": tok.add_space_prefix, "has_chat_template": bool(tok.chat_template),
        "files": list(tok.files),
    }


def format_summary(section: dict) -> list:
    """The text lines `wconv inspect` shows for a `summary` section."""
    t = section
    lines = [f"tokenizer: {t['model']}, {t['n_tokens']} tokens"
             + (f", {t['kind']}" if t.get("kind") else "")
             + (f" (from {t['source']})" if t.get("source") else "")]
    details = []
    if t.get("pre"):
        details.append(f"pre-tokenizer {t['pre']}")
    if t.get("n_merges"):
        details.append(f"{t['n_merges']} merges")
    if t.get("add_space_prefix") is not None:
        details.append(f"add_space_prefix {t['add_space_prefix']}")
    for key in ("add_bos", "add_eos"):
        if t.get(key) is not None:
            details.append(f"{key} {t[key]}")
    details.append("chat template: " + ("yes" if t.get("has_chat_template") else "no"))
    lines.append("  " + ", ".join(details))
    special = t.get("special") or {}
    if special:
        lines.append("  special: " + ", ".join(f"{role} {v['id']} {v['text']!r}" for role, v in special.items()))
    if t.get("n_control_tokens"):
        shown = ", ".join(repr(v["text"]) for v in t.get("control_tokens", [])[:8])
        more = t["n_control_tokens"] - min(8, len(t.get("control_tokens", [])))
        lines.append(f"  control tokens: {t['n_control_tokens']} ({shown}{', ...' if more > 0 else ''})")
    if t.get("sample_tokens"):
        lines.append("  first tokens: " + ", ".join(f"{v['id']} {v['text']!r}" for v in t["sample_tokens"]))
    if t.get("eog_ids"):
        lines.append(f"  end of generation ids: {t['eog_ids']}")
    if t.get("token_types"):
        lines.append("  token types: " + ", ".join(f"{k} {v}" for k, v in t["token_types"].items()))
    return lines


def as_model(path):
    """A tokenizer file as a tensor-less Model (for `wconv inspect`), or None if `path` is no tokenizer file."""
    path = os.fspath(path)
    if os.path.isdir(path) or not os.path.isfile(path):
        return None
    kind = sniff(path)
    if kind in ("hf-tokenizer-config", "hf-generation-config"):
        raise UnsupportedError(path, f"is {WHAT[kind]}; inspect the tokenizer.json or tokenizer.model beside it")
    if kind not in TOKENIZER_KINDS:
        return None
    tok = _load(path, kind)
    return Model(config=Config(arch="unknown", vocab_size=len(tok.tokens)), tokenizer=tok,
                 metadata={"_input_files": list(tok.files)}, source_format=kind, source_layout="tokenizer", path=path)


def announce(model) -> None:
    """One stderr line when the model's tokenizer was picked up from beside it (convert)."""
    from .progress import warn

    tok = model.tokenizer
    if tok is not None and getattr(tok, "found_beside", False):
        warn(model.path, f"using the tokenizer found beside it: {tok.source} ({WHAT.get(tok.kind, tok.kind)}, "
                         f"{len(tok.tokens)} tokens)")
