"""GPT-2 style vocabularies in two files: `vocab.json` + `merges.txt` (HF) or `encoder.json` +
`vocab.bpe` (OpenAI's release; the same bytes under other names). Read only: `--to hf` writes
tokenizer.json (wconv.formats.hf_tokenizer), which holds the same vocabulary.

vocab.json is a JSON object {byte-level token: id}; the merges file is an optional
`#version: ...` line, then one merge per line, `left right`, in rank order. Neither file says how
text is split: the format is GPT-2's, whose regex llama.cpp calls `gpt-2`. The one special token
is `<|endoftext|>` (bos = eos, as HF's GPT2Tokenizer has it); tokens spelled like specials
(`<|...|>`) are CONTROL, as llama.cpp's converter types them.
"""
from __future__ import annotations

import json
import os

from ..errors import FormatError
from ..mapped import MAX_TOKENIZER_FILE, read_whole
from ..model import Tokenizer
from .. import pretokenizer

NORMAL, CONTROL, UNUSED = 1, 3, 5
END_OF_TEXT = "<|endoftext|>"


def looks_like_merges(head: bytes) -> bool:
    """A merges file: '#version' first, or a first line of two space-separated non-empty parts."""
    if head.startswith(b"#version"):
        return True
    line = head.split(b"\n", 1)[0].rstrip(b"\r")
    if b"\0" in line:  # binary (e.g. a safetensors header length), not a text line
        return False
    parts = line.split(b" ")
    return len(parts) == 2 and all(parts) and b"\t" not in line and not line.startswith((b"{", b"["))


def is_vocab_json(obj) -> bool:
    """{str: int} with ids 0..n-1 roughly: what vocab.json / encoder.json hold."""
    return (isinstance(obj, dict) and len(obj) > 1
            and all(isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) for k, v in obj.items()))


def read_merges(path) -> list:
    path = os.fspath(path)
    text = bytes(read_whole(path, max_bytes=MAX_TOKENIZER_FILE, what="BPE merges file"))
    try:
        lines = text.decode("utf-8").split("\n")
    except UnicodeDecodeError as e:
        raise FormatError(path, f"BPE merges file is not UTF-8 ({e.reason} at byte {e.start})") from None
    merges = []
    for number, line in enumerate(lines, 1):
        line = line.rstrip("\r")
        if not line or (number == 1 and line.startswith("#")):
            continue
        parts = line.split(" ")
        if len(parts) != 2 or not all(parts):
            raise FormatError(path, f"line {number} is not a merge 'left right'")
        merges.append(f"{parts[0]} {parts[1]}")
    return merges


def read_vocab_json(path) -> dict:
    path = os.fspath(path)
    raw = bytes(read_whole(path, max_bytes=MAX_TOKENIZER_FILE, what="vocab.json"))
    try:
        obj = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise FormatError(path, f"not valid JSON: {e}") from None
    if not is_vocab_json(obj):
        raise FormatError(path, "not a BPE vocabulary (a JSON object of token -> id)")
    return obj


def looks_special(text: str) -> bool:
    return text.startswith("<|") and text.endswith("|>")


def from_vocab(vocab: dict, merges: list, where) -> tuple:
    """(tokens, types) in id order; ids missing from `vocab` become [PAD{id}] (UNUSED)."""
    n = max(vocab.values()) + 1
    if min(vocab.values()) < 0 or n > 4 * len(vocab) + 1024:
        raise FormatError(where, f"token ids run from {min(vocab.values())} to {n - 1} for {len(vocab)} tokens")
    by_id = [None] * n
    for text, i in vocab.items():
        if by_id[i] is not None:
            raise FormatError(where, f"id {i} is given to both {by_id[i]!r} and {text!r}")
        by_id[i] = text
    tokens, types = [], []
    for i, text in enumerate(by_id):
        if text is None:
            tokens.append(f"[PAD{i}]".encode())
            types.append(UNUSED)
        else:
            tokens.append(text.encode("utf-8"))
            types.append(CONTROL if looks_special(text) else NORMAL)
    return tokens, types


def read(vocab_path, merges_path) -> Tokenizer:
    vocab_path, merges_path = os.fspath(vocab_path), os.fspath(merges_path)
    vocab = read_vocab_json(vocab_path)
    merges = read_merges(merges_path)
    tokens, types = from_vocab(vocab, merges, vocab_path)
    for m in merges[:1000]:  # a merges file of another vocabulary names tokens this one lacks
        left, right = m.split(" ")
        if left not in vocab or right not in vocab or left + right not in vocab:
            raise FormatError(merges_path, f"merge {m!r} does not fit the vocabulary in {vocab_path}: "
                                           "the two files belong to different tokenizers")
    entry = pretokenizer.identify(pretokenizer.describe_pattern("gpt2-vocab", pretokenizer.GPT2_PATTERN), vocab_path)
    eot = vocab.get(END_OF_TEXT)
    return Tokenizer(model="gpt2", tokens=tokens, token_types=types, merges=merges, bos_id=eot, eos_id=eot,
                     pre=entry.pre, kind="gpt2-vocab", source=vocab_path, files=[vocab_path, merges_path])

