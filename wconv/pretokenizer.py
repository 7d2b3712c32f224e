"""Which llama.cpp pre-tokenizer (GGUF `tokenizer.ggml.pre`) a vocabulary needs: a table, as data.

A BPE vocabulary is only half a tokenizer: the text is first cut into pieces (a regex, byte-level
mapping, a space marker) and llama.cpp reimplements a fixed set of those cuttings, chosen by name.
llama.cpp's own converter picks the name by hashing the token ids of a probe text, so it fails on
every tokenizer it has not hashed yet. wconv reads the tokenizer's own description instead: the
`normalizer`, `pre_tokenizer` and BPE flags of tokenizer.json, or the regex a format implies
(Meta's tiktoken tokenizer.model, OpenAI's encoder.json/vocab.bpe). Each description wconv knows
maps to one name below; any other description is refused, showing it, because llama.cpp would
tokenise wrongly under a guessed name.

The names and what they mean in llama.cpp come from its src/llama-vocab.cpp (the regex per name;
`llama-bpe` also implies ignore_merges); each entry's tokenizer.json form is also what wconv writes
for `--to hf`. tests/test_vocab_llamacpp.py checks every entry against llama.cpp's tokenisation.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field

from .errors import UnsupportedError

SPACE_MARK = "\u2581"  # sentencepiece's visible space

# The regexes, as written in the tokenizers that use them.
GPT2_PATTERN = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")  # also OpenAI's cl100k_base
QWEN2_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def _split(pattern: str) -> dict:
    return {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": False}


def _byte_level(add_prefix_space=False, trim_offsets=True, use_regex=True) -> dict:
    return {"type": "ByteLevel", "add_prefix_space": add_prefix_space, "trim_offsets": trim_offsets,
            "use_regex": use_regex}


_SP_REPLACE = {"type": "Replace", "pattern": {"String": " "}, "content": SPACE_MARK}
_SP_PREPEND = {"type": "Prepend", "prepend": SPACE_MARK}


@dataclass(frozen=True)
class Entry:
    pre: str  # llama.cpp's name
    model: str  # GGUF tokenizer.ggml.model: "gpt2" (byte-level BPE) or "llama" (sentencepiece-style)
    source: str  # "tokenizer.json", "tiktoken" or "gpt2-vocab": the kind of description
    normalizer: dict | None = None  # tokenizer.json form (also what --to hf writes)
    pre_tokenizer: dict | None = None
    ignore_merges: bool = False
    byte_fallback: bool = False
    pattern: str | None = None  # tiktoken / gpt2-vocab: the regex the format implies
    add_space_prefix: bool | None = None  # sentencepiece-style: GGUF tokenizer.ggml.add_space_prefix
    note: str = field(default="", compare=False)


TABLE = (
    # Byte-level BPE.
    Entry("gpt-2", "gpt2", "tokenizer.json", None, _byte_level(False, True, True),
          note="GPT-2 and models reusing its tokenizer"),
    Entry("llama-bpe", "gpt2", "tokenizer.json", None,
          {"type": "Sequence", "pretokenizers": [_split(LLAMA3_PATTERN), _byte_level(False, True, False)]},
          ignore_merges=True, note="Llama 3, 3.1, 3.2, 3.3"),
    Entry("qwen2", "gpt2", "tokenizer.json", {"type": "NFC"},
          {"type": "Sequence", "pretokenizers": [_split(QWEN2_PATTERN), _byte_level(False, False, False)]},
          note="Qwen2, Qwen2.5, Qwen3"),
    # Sentencepiece vocabularies exported as BPE with byte fallback (HF Llama 2, TinyLlama, Mistral, Phi-3).
    Entry("default", "llama", "tokenizer.json", {"type": "Sequence", "normalizers": [_SP_PREPEND, _SP_REPLACE]},
          None, byte_fallback=True, add_space_prefix=True, note="sentencepiece BPE, legacy normalizer"),
    Entry("default", "llama", "tokenizer.json", None,
          {"type": "Metaspace", "replacement": SPACE_MARK, "prepend_scheme": "first", "split": False},
          byte_fallback=True, add_space_prefix=True, note="sentencepiece BPE, Metaspace (legacy=False)"),
    Entry("default", "llama", "tokenizer.json", None,
          {"type": "Metaspace", "replacement": SPACE_MARK, "prepend_scheme": "always", "split": False},
          byte_fallback=True, add_space_prefix=True, note="sentencepiece BPE, Metaspace"),
    Entry("default", "llama", "tokenizer.json", _SP_REPLACE, None, byte_fallback=True, add_space_prefix=False,
          note="sentencepiece BPE without a dummy prefix"),
    # Formats whose files hold no description: the regex is the format's own.
    Entry("llama-bpe", "gpt2", "tiktoken", pattern=LLAMA3_PATTERN, ignore_merges=True,
          note="Meta's tokenizer.model for Llama 3 (tiktoken ranks; tiktoken matches whole pieces first)"),
    Entry("gpt-2", "gpt2", "gpt2-vocab", pattern=GPT2_PATTERN,
          note="OpenAI's encoder.json + vocab.bpe, HF vocab.json + merges.txt (GPT2Tokenizer)"),
)


# ----------------------------------------------------------------------------- descriptions
def _canon_normalizer(n) -> tuple:
    if n is None:
        return ()
    if not isinstance(n, dict):
        return (("?", json.dumps(n, sort_keys=True)),)
    kind = n.get("type")
    if kind == "Sequence":
        return tuple(step for sub in n.get("normalizers") or [] for step in _canon_normalizer(sub))
    if kind == "Prepend":
        return (("Prepend", n.get("prepend")),)
    if kind == "Replace":
        return (("Replace", _pattern(n.get("pattern")), n.get("content")),)
    if kind in ("NFC", "NFD", "NFKC", "NFKD", "Lowercase", "Strip", "StripAccents"):
        return ((kind,) + tuple(sorted((k, v) for k, v in n.items() if k != "type")),)
    return ((str(kind), json.dumps(n, sort_keys=True)),)


def _pattern(p) -> tuple:
    if isinstance(p, dict) and len(p) == 1:
        (kind, value), = p.items()
        return (kind, value)
    return ("?", json.dumps(p, sort_keys=True))


def _canon_pre(p) -> tuple:
    if p is None:
        return ()
    if not isinstance(p, dict):
        return (("?", json.dumps(p, sort_keys=True)),)
    kind = p.get("type")
    if kind == "Sequence":
        return tuple(step for sub in p.get("pretokenizers") or [] for step in _canon_pre(sub))
    if kind == "ByteLevel":  # trim_offsets only changes offsets, not ids
        return (("ByteLevel", bool(p.get("add_prefix_space", True)), bool(p.get("use_regex", True))),)
    if kind == "Split":
        return (("Split", _pattern(p.get("pattern")), p.get("behavior"), bool(p.get("invert", False))),)
    if kind == "Metaspace":
        scheme = p.get("prepend_scheme") or ("always" if p.get("add_prefix_space", True) else "never")
        return (("Metaspace", p.get("replacement"), scheme, bool(p.get("split", True))),)
    if kind == "Digits":
        return (("Digits", bool(p.get("individual_digits", False))),)
    return ((str(kind), json.dumps(p, sort_keys=True)),)


def describe_tokenizer_json(tj: dict, model_type: str) -> tuple:
    """The parts of a tokenizer.json that decide how text is cut before BPE, in canonical form."""
    m = tj.get("model") if isinstance(tj.get("model"), dict) else {}
    return ("tokenizer.json", _canon_normalizer(tj.get("normalizer")), _canon_pre(tj.get("pre_tokenizer")),
            bool(m.get("ignore_merges", False)), bool(m.get("byte_fallback", False)))


def describe_pattern(source: str, pattern: str) -> tuple:
    return (source, pattern)


def _description(e: Entry) -> tuple:
    if e.source == "tokenizer.json":
        return ("tokenizer.json", _canon_normalizer(e.normalizer), _canon_pre(e.pre_tokenizer),
                e.ignore_merges, e.byte_fallback)
    return (e.source, e.pattern)


_BY_DESCRIPTION = {}
for _e in TABLE:
    _BY_DESCRIPTION.setdefault(_description(_e), _e)


def format_description(d: tuple) -> str:
    """One line a user can read (and a maintainer can turn into a new TABLE entry)."""
    if d[0] != "tokenizer.json":
        return f"{d[0]} pattern {d[1]!r}"

    def step(s):
        name, *args = s
        if name == "Split":
            (pkind, ptext), behavior, invert = args
            return f"Split({pkind} {ptext!r}, behavior={behavior}, invert={invert})"
        if name == "ByteLevel":
            return f"ByteLevel(add_prefix_space={args[0]}, use_regex={args[1]})"
        if name == "Metaspace":
            return f"Metaspace(replacement={args[0]!r}, prepend_scheme={args[1]}, split={args[2]})"
        if name == "Replace":
            return f"Replace({args[0][1]!r} -> {args[1]!r})"
        return f"{name}({', '.join(map(str, args))})" if args else name

    _, norm, pre, ignore_merges, byte_fallback = d
    return (f"normalizer {' + '.join(map(step, norm)) or 'none'}; pre_tokenizer {' + '.join(map(step, pre)) or 'none'};"
            f" ignore_merges={ignore_merges}, byte_fallback={byte_fallback}")


def identify(description: tuple, where) -> Entry:
    """The table entry for `description`, or UnsupportedError naming `where` and showing it."""
    entry = _BY_DESCRIPTION.get(description)
    if entry is None:
        raise UnsupportedError(where, f"unknown pre-tokenizer ({format_description(description)}); wconv does not "
                                      "guess llama.cpp's tokenizer.ggml.pre name, because a wrong one tokenises "
                                      "text wrongly (see wconv/pretokenizer.py TABLE)")
    return entry


def for_writing(model: str, pre: str | None, add_space_prefix: bool | None = None) -> Entry | None:
    """The tokenizer.json form of a GGUF-style vocabulary (`--to hf`), or None if wconv has none."""
    for e in TABLE:
        if e.source != "tokenizer.json" or e.model != model:
            continue
        if model == "gpt2" and e.pre == pre:
            return e
        if model == "llama" and e.add_space_prefix == (True if add_space_prefix is None else add_space_prefix):
            return e
    return None
