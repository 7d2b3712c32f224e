"""Hugging Face tokenizer files: tokenizer.json, tokenizer_config.json, generation_config.json.

Read: a tokenizer.json whose model is BPE, either byte-level (GPT-2, Llama 3, Qwen2: GGUF model
"gpt2", tokens in GPT-2's byte alphabet, merges) or sentencepiece-style with byte fallback
(HF Llama 2, TinyLlama, Mistral, Phi-3: GGUF model "llama", '\u2581' for spaces, <0xXX> byte
tokens). Which one, and llama.cpp's pre-tokenizer name, come from wconv.pretokenizer's table.
Token types follow llama.cpp's converter: added tokens that are special (or spelled like
specials, `<|...|>`) are CONTROL, other added tokens USER_DEFINED, `<0xXX>` BYTE, the BPE
model's unk_token UNKNOWN, ids nobody uses `[PAD{id}]` UNUSED, the rest NORMAL.
A sentencepiece-style tokenizer.json has no scores, which llama.cpp's sentencepiece tokenizer
needs: they are rebuilt from the merge ranks (a token made by an earlier merge scores higher),
which makes llama.cpp merge in the order HF's BPE does.
tokenizer_config.json gives bos/eos/unk/pad/sep tokens, add_bos_token/add_eos_token and
chat_template; generation_config.json the eos ids that end generation.

Write (`--to hf`): tokenizer.json + tokenizer_config.json for any GGUF-style vocabulary wconv
holds (`tokenizer_class` PreTrainedTokenizerFast: transformers loads tokenizer.json as written).
For sentencepiece-style vocabularies the merges are rebuilt from the scores, ordered as HF's own
sentencepiece converter orders them (by the merged piece's score).
"""
from __future__ import annotations

import contextlib
import json
import os
import re

from ..errors import FormatError, UnsupportedError
from ..mapped import MAX_TOKENIZER_FILE, read_whole
from ..model import Tokenizer
from .. import pretokenizer

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
SPACE_MARK = pretokenizer.SPACE_MARK
_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")
SPECIAL_ROLES = ("bos", "eos", "unk", "pad", "sep")
# The tokenizer_config.json keys that only a tokenizer_config.json has.
_CONFIG_KEYS = {"tokenizer_class", "added_tokens_decoder", "chat_template", "model_max_length", "add_bos_token",
                "add_eos_token", "bos_token", "eos_token", "unk_token", "pad_token", "clean_up_tokenization_spaces"}
_MODEL_CONFIG_KEYS = {"architectures", "model_type", "hidden_size", "n_embd", "num_hidden_layers", "n_layer"}


# ----------------------------------------------------------------------------- recognising
def read_json(path, what: str):
    raw = bytes(read_whole(path, max_bytes=MAX_TOKENIZER_FILE, what=what))
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise FormatError(path, f"{what} is not valid JSON: {' '.join(str(e).split())[:200]}") from None


def is_tokenizer_json(obj) -> bool:
    return isinstance(obj, dict) and isinstance(obj.get("model"), dict) and "vocab" in obj["model"]


def is_tokenizer_config(obj) -> bool:
    return (isinstance(obj, dict) and not is_tokenizer_json(obj) and bool(_CONFIG_KEYS & obj.keys())
            and not _MODEL_CONFIG_KEYS & obj.keys())


def is_generation_config(obj) -> bool:
    return (isinstance(obj, dict) and not _MODEL_CONFIG_KEYS & obj.keys() and not is_tokenizer_config(obj)
            and ("_from_model_config" in obj or "eos_token_id" in obj or "bos_token_id" in obj))


def looks_special(text: str) -> bool:
    """llama.cpp's converter also makes CONTROL the added tokens spelled like specials."""
    return ((text.startswith("<|") and text.endswith("|>")) or (text.startswith("<\uff5c") and text.endswith("\uff5c>"))
            or text in ("<pad>", "<mask>"))


# ----------------------------------------------------------------------------- reading
def _merge_pairs(merges, path) -> list:
    pairs = []
    for i, m in enumerate(merges):
        if isinstance(m, str):
            parts = m.split(" ")
            if len(parts) != 2:
                raise FormatError(path, f"merge #{i} {m[:60]!r} is not 'left right'")
        elif isinstance(m, list) and len(m) == 2 and all(isinstance(p, str) for p in m):
            parts = m
        else:
            raise FormatError(path, f"merge #{i} is neither 'left right' nor [left, right]")
        pairs.append((parts[0], parts[1]))
    return pairs


def _token_text(entry):
    """A special token in tokenizer_config.json: "text" or {"content": "text", ...}."""
    if isinstance(entry, str):
        return entry
    if isinstance(entry, dict) and isinstance(entry.get("content"), str):
        return entry["content"]
    return None


def _post_processor_specials(post) -> tuple:
    """(leading special, trailing special, known) from a post_processor: what encode() adds."""
    if not isinstance(post, dict):
        return None, None, False
    kind = post.get("type")
    if kind == "Sequence":
        first = last = None
        known = False
        for p in post.get("processors") or []:
            f, l, k = _post_processor_specials(p)
            first, last, known = first or f, last or l, known or k
        return first, last, known
    if kind == "ByteLevel":
        return None, None, True
    if kind == "TemplateProcessing":
        single = post.get("single") or []

        def special(item):
            return item.get("SpecialToken", {}).get("id") if isinstance(item, dict) else None
        first = special(single[0]) if len(single) > 1 else None
        last = special(single[-1]) if len(single) > 1 else None
        return first, last, True
    return None, None, False


def read(path) -> Tokenizer:
    """tokenizer.json alone (wconv.vocab adds tokenizer_config.json / generation_config.json)."""
    path = os.fspath(path)
    tj = read_json(path, "tokenizer.json")
    if not is_tokenizer_json(tj):
        raise FormatError(path, "not a Hugging Face tokenizer.json (no model.vocab)")
    m = tj["model"]
    if m.get("type", "BPE") != "BPE":
        raise UnsupportedError(path, f"tokenizer.json model type {m.get('type')!r} is not supported (wconv reads "
                                     "BPE tokenizers: byte-level or sentencepiece-style with byte fallback)")
    vocab = m.get("vocab")
    if not isinstance(vocab, dict) or not vocab or not all(
            isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) and v >= 0 for k, v in vocab.items()):
        raise FormatError(path, "model.vocab is not an object of token -> non-negative id")
    merges = _merge_pairs(m.get("merges") or [], path)
    added = [a for a in tj.get("added_tokens") or [] if isinstance(a, dict)]
    for a in added:
        if not isinstance(a.get("id"), int) or a["id"] < 0 or not isinstance(a.get("content"), str):
            raise FormatError(path, f"added token {str(a)[:80]} has no integer id or text content")
    entry = pretokenizer.identify(pretokenizer.describe_tokenizer_json(tj, m.get("type")), path)

    n = max(max(vocab.values()), max((a["id"] for a in added), default=-1)) + 1
    if n > 4 * (len(vocab) + len(added)) + 1024:
        raise FormatError(path, f"token ids reach {n - 1} for {len(vocab) + len(added)} tokens")
    texts, types = [None] * n, [NORMAL] * n
    for text, i in vocab.items():
        if texts[i] is not None:
            raise FormatError(path, f"id {i} is given to both {texts[i]!r} and {text!r}")
        texts[i] = text
    unk_text = m.get("unk_token") if isinstance(m.get("unk_token"), str) else None
    for i, text in enumerate(texts):
        if text is None:
            continue
        if entry.model == "llama" and _BYTE_TOKEN.fullmatch(text):
            types[i] = BYTE
    for a in added:
        i, text = a["id"], a["content"]
        if a.get("special") or looks_special(text):
            types[i] = CONTROL
        else:
            types[i] = USER_DEFINED
            if entry.model == "llama":  # llama.cpp matches user-defined tokens in raw text, spaces as spaces
                text = text.replace(SPACE_MARK, " ")
        texts[i] = text
    ids = {t: i for i, t in enumerate(texts) if t is not None}
    unk_id = ids.get(unk_text) if unk_text is not None else None
    if unk_id is not None:
        types[unk_id] = UNKNOWN
    for i, text in enumerate(texts):
        if text is None:
            texts[i], types[i] = f"[PAD{i}]", UNUSED

    tok = Tokenizer(model=entry.model, tokens=[t.encode("utf-8") for t in texts], token_types=types,
                    unk_id=unk_id, pre=entry.pre if entry.model == "gpt2" else "default",
                    add_space_prefix=entry.add_space_prefix, kind="hf-tokenizer-json", source=path, files=[path])
    if entry.model == "gpt2":
        for a, b in merges:
            if " " in a or " " in b:
                raise UnsupportedError(path, f"merge ({a!r}, {b!r}) has a space inside a part, which GGUF's "
                                             "'left right' merges cannot hold")
        tok.merges = [f"{a} {b}" for a, b in merges]
    else:
        tok.scores = _scores_from_merges(texts, types, merges, ids)
    first, last, known = _post_processor_specials(tj.get("post_processor"))
    if known:
        tok.add_bos = first is not None
        tok.add_eos = last is not None
        tok.bos_id = ids.get(first) if first is not None else None
        tok.eos_id = ids.get(last) if last is not None else None
    return tok


def _scores_from_merges(texts, types, merges, ids) -> list:
    """Sentencepiece-style scores: -k for the k-th token made by a merge, lower for the rest."""
    scores = [0.0] * len(texts)
    made = {}
    for a, b in merges:
        t = ids.get(a + b)
        if t is not None and t not in made:
            made[t] = len(made) + 1
    rest = len(made)
    for i, kind in enumerate(types):
        if kind != NORMAL:
            continue
        if i in made:
            scores[i] = -float(made[i])
        else:
            rest += 1
            scores[i] = -float(rest)
    return scores


def token_ids(tok: Tokenizer, texts) -> dict:
    """text -> the first id whose token reads as that text (invalid UTF-8 replaced), for `texts`."""
    texts = set(texts)
    if any("\ufffd" in t for t in texts):  # could match a token's replaced bytes: decode them all
        out = {}
        for i, t in enumerate(tok.tokens):
            out.setdefault(bytes(t).decode("utf-8", "replace"), i)
        return {t: out[t] for t in texts if t in out}
    # Otherwise a text matches exactly the token of its UTF-8 bytes: no decoding of the vocabulary.
    # (A text with a lone surrogate has no UTF-8 form, and no decoded token equals it.)
    wanted = {}
    for t in texts:
        with contextlib.suppress(UnicodeEncodeError):
            wanted[t.encode("utf-8")] = t
    out = {}
    for i, t in enumerate(tok.tokens):
        text = wanted.get(bytes(t))
        if text is not None and text not in out:
            out[text] = i
            if len(out) == len(wanted):
                break
    return out


def apply_config(tok: Tokenizer, config: dict, path, *, added_tokens_decoder: bool = False) -> None:
    """Special tokens, add_bos/add_eos and chat_template from a tokenizer_config.json.

    added_tokens_decoder=True (a sentencepiece tokenizer.model beside it) also applies its added
    tokens, as llama.cpp's converter does: their text replaces the piece, special ones CONTROL,
    others USER_DEFINED; ids past the model's pieces extend the vocabulary ([PAD{id}] in gaps).
    """
    path = os.fspath(path)
    if added_tokens_decoder and isinstance(config.get("added_tokens_decoder"), dict):
        _apply_added_tokens(tok, config["added_tokens_decoder"], path)
    texts = {role: _token_text(config.get(f"{role}_token")) for role in SPECIAL_ROLES}
    ids = token_ids(tok, [t for t in texts.values() if t is not None])
    for role in SPECIAL_ROLES:
        text = texts[role]
        if text is not None and text in ids:
            setattr(tok, f"{role}_id", ids[text])
    for role in ("bos", "eos"):
        flag = config.get(f"add_{role}_token")
        if isinstance(flag, bool) and getattr(tok, f"add_{role}") is None:
            setattr(tok, f"add_{role}", flag)  # a post_processor in tokenizer.json has the last word
    template = config.get("chat_template")
    if isinstance(template, list):  # [{"name": ..., "template": ...}]: GGUF holds the default one
        template = next((t.get("template") for t in template if isinstance(t, dict) and t.get("name") == "default"),
                        None)
    if isinstance(template, str) and template:
        tok.chat_template = template
    tok.files.append(path)


def _apply_added_tokens(tok: Tokenizer, decoder: dict, path) -> None:
    entries = []
    for key, data in decoder.items():
        if not (isinstance(key, str) and key.isdigit() and isinstance(data, dict) and isinstance(data.get("content"), str)):
            raise FormatError(path, f"added_tokens_decoder entry {key!r} is not id -> {{content, ...}}")
        entries.append((int(key), data))
    if not entries:
        return
    top = max(i for i, _ in entries)
    if top > 4 * len(tok.tokens) + 1024:
        raise FormatError(path, f"added token id {top} is far beyond the vocabulary of {len(tok.tokens)}")
    if top >= len(tok.tokens):
        n0 = len(tok.tokens)
        tok.tokens += [f"[PAD{i}]".encode() for i in range(n0, top + 1)]
        tok.scores = (tok.scores or [0.0] * n0) + [-1000.0] * (top + 1 - n0)
        tok.token_types = (tok.token_types or [NORMAL] * n0) + [UNUSED] * (top + 1 - n0)
    for i, data in entries:
        text = data["content"]
        if tok.token_types[i] in (CONTROL, UNKNOWN) and bytes(tok.tokens[i]) == text.encode():
            continue  # the model's own special pieces keep their type (<unk> stays UNKNOWN)
        if data.get("special") or looks_special(text):
            tok.token_types[i] = CONTROL
        else:
            tok.token_types[i] = USER_DEFINED
            text = text.replace(SPACE_MARK, " ")
        tok.tokens[i] = text.encode("utf-8")
        if tok.scores is not None:
            tok.scores[i] = -1000.0


def apply_generation_config(tok: Tokenizer, config: dict, path) -> None:
    """eos ids that end generation (a list in chat models, e.g. Llama 3.1's [128001, 128008, 128009])."""
    n = len(tok.tokens)

    def valid(v):
        return isinstance(v, int) and not isinstance(v, bool) and 0 <= v < n

    eos = config.get("eos_token_id")
    eos_list = [v for v in (eos if isinstance(eos, list) else [eos]) if valid(v)]
    if eos_list:
        if tok.eos_id is None:
            tok.eos_id = eos_list[0]
        if len(eos_list) > 1:
            tok.eog_ids = eos_list
    for role in ("bos", "pad"):
        v = config.get(f"{role}_token_id")
        if valid(v) and getattr(tok, f"{role}_id") is None:
            setattr(tok, f"{role}_id", v)
    tok.files.append(os.fspath(path))


# ----------------------------------------------------------------------------- writing
def _text(tok: Tokenizer, i) -> str | None:
    return bytes(tok.tokens[i]).decode("utf-8") if isinstance(i, int) and 0 <= i < len(tok.tokens) else None


def sentencepiece_merges(tok: Tokenizer) -> list:
    """(left, right) merges equivalent to sentencepiece's score-ordered merging."""
    types = tok.token_types or [NORMAL] * len(tok.tokens)
    scores = tok.scores or [0.0] * len(tok.tokens)
    texts = [bytes(t).decode("utf-8") for t in tok.tokens]
    normal = {t: i for i, t in enumerate(texts) if types[i] == NORMAL}
    found = []
    for t, i in normal.items():
        for cut in range(1, len(t)):
            a, b = t[:cut], t[cut:]
            if a in normal and b in normal:
                found.append((-scores[i], i, normal[a], normal[b], a, b))
    found.sort()
    return [(a, b) for *_, a, b in found]


def tokenizer_json(tok: Tokenizer, where) -> dict:
    """The tokenizer.json of a GGUF-style vocabulary."""
    entry = pretokenizer.for_writing(tok.model, tok.pre, tok.add_space_prefix)
    if entry is None:
        raise UnsupportedError(where, f"no tokenizer.json form for a {tok.model!r} vocabulary with pre-tokenizer "
                                      f"{tok.pre!r} (wconv/pretokenizer.py TABLE)")
    types = tok.token_types or [NORMAL] * len(tok.tokens)
    texts = [bytes(t).decode("utf-8", "strict") for t in tok.tokens]
    vocab = {}
    for i, t in enumerate(texts):
        if t in vocab:
            raise UnsupportedError(where, f"token {t!r} appears at ids {vocab[t]} and {i}; a tokenizer.json "
                                          "vocabulary cannot hold both")
        vocab[t] = i
    added = [{"id": i, "content": texts[i], "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": types[i] in (CONTROL, UNKNOWN)}
             for i in range(len(texts)) if types[i] in (CONTROL, UNKNOWN, USER_DEFINED)]
    if tok.model == "gpt2":
        merges = [m.split(" ", 1) for m in tok.merges or []]
        decoder = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True}
    else:
        merges = [list(p) for p in sentencepiece_merges(tok)]
        decoder = {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": SPACE_MARK}, "content": " "}, {"type": "ByteFallback"},
            {"type": "Fuse"}] + ([{"type": "Strip", "content": " ", "start": 1, "stop": 0}]
                                 if entry.add_space_prefix else [])}
    return {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
        "normalizer": entry.normalizer, "pre_tokenizer": entry.pre_tokenizer,
        "post_processor": _template_processing(tok), "decoder": decoder,
        "model": {"type": "BPE", "dropout": None, "unk_token": _text(tok, tok.unk_id) if tok.model == "llama" else None,
                  "continuing_subword_prefix": None, "end_of_word_suffix": None, "fuse_unk": tok.model == "llama",
                  "byte_fallback": entry.byte_fallback, "ignore_merges": entry.ignore_merges,
                  "vocab": vocab, "merges": merges},
    }


def _template_processing(tok: Tokenizer):
    bos = _text(tok, tok.bos_id) if tok.add_bos else None
    eos = _text(tok, tok.eos_id) if tok.add_eos else None
    if bos is None and eos is None:
        return None

    def seq(name, type_id):
        return ([{"SpecialToken": {"id": bos, "type_id": type_id}}] if bos else []) + [
            {"Sequence": {"id": name, "type_id": type_id}}] + ([{"SpecialToken": {"id": eos, "type_id": type_id}}]
                                                               if eos else [])
    specials = {t: {"id": t, "ids": [i], "tokens": [t]} for t, i in ((bos, tok.bos_id), (eos, tok.eos_id)) if t}
    return {"type": "TemplateProcessing", "single": seq("A", 0), "pair": seq("A", 0) + seq("B", 1),
            "special_tokens": specials}


def tokenizer_config(tok: Tokenizer, *, model_max_length=None) -> dict:
    types = tok.token_types or [NORMAL] * len(tok.tokens)
    config = {"tokenizer_class": "PreTrainedTokenizerFast"}
    for role in SPECIAL_ROLES:
        text = _text(tok, getattr(tok, f"{role}_id"))
        if text is not None:
            config[f"{role}_token"] = text
    config["add_bos_token"] = bool(tok.add_bos)
    config["add_eos_token"] = bool(tok.add_eos)
    config["clean_up_tokenization_spaces"] = False
    if model_max_length:
        config["model_max_length"] = int(model_max_length)
    if tok.chat_template:
        config["chat_template"] = tok.chat_template
    config["added_tokens_decoder"] = {
        str(i): {"content": _text(tok, i), "lstrip": False, "normalized": False, "rstrip": False,
                 "single_word": False, "special": types[i] in (CONTROL, UNKNOWN)}
        for i in range(len(tok.tokens)) if types[i] in (CONTROL, UNKNOWN, USER_DEFINED)}
    return config


def write(tok: Tokenizer, directory, *, where=None, model_max_length=None) -> list:
    """tokenizer.json + tokenizer_config.json in `directory`; the file names written."""
    where = where or tok.source or None
    files = {"tokenizer.json": tokenizer_json(tok, where),
             "tokenizer_config.json": tokenizer_config(tok, model_max_length=model_max_length)}
    for name, obj in files.items():
        with open(os.path.join(directory, name), "w", encoding="utf-8") as f:
            json.dump(obj, f, ensure_ascii=False, indent=None if name == "tokenizer.json" else 2)
            f.write("\n")
    return list(files)
