"""tiktoken BPE rank files: Meta's Llama 3 `tokenizer.model` (read; `--to hf` writes it as tokenizer.json).

The file is text, one token per line: the token's bytes in base64, a space, its rank (= its id).
Nothing else is stored: the split regex and the special tokens live in the code that reads it.
For Meta's format they are those of Meta's Llama 3 tokenizer (llama3 / llama-models
`tokenizer.py`): the cl100k-style regex (llama.cpp `llama-bpe`) and 256 special tokens numbered
from the first id after the ranks, `<|begin_of_text|>` (bos), `<|end_of_text|>` (eos), ...,
`<|eot_id|>`; the ones without a role are `<|reserved_special_token_N|>`. The names below are
Llama 3.1's (3.2 and 3.3 use the same ids; Llama 3.0 called 128004/5/8/10 reserved_special_token_2/3/4/5:
same ids, same roles, the file cannot tell them apart).

BPE merges are not stored either; like llama.cpp's and HF's converters we rebuild them from the
ranks: a token of rank r is the merge of the two parts that BPE over ranks < r leaves of its bytes.
"""
from __future__ import annotations

import base64
import binascii
import os

from ..errors import FormatError, UnsupportedError
from ..mapped import MAX_TOKENIZER_FILE, read_whole
from ..model import Tokenizer
from .. import pretokenizer
from . import byte_level

NORMAL, CONTROL = 1, 3
N_SPECIAL = 256
_NAMED_SPECIALS = ("<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                   "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|step_id|>",
                   "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>")
# Base vocabulary sizes of tiktoken files whose special tokens / regex are NOT Llama 3's.
_OTHER_FORMATS = {200000: "Meta's Llama 4 tokenizer.model (o200k-style regex, other special tokens)",
                  199998: "OpenAI's o200k_base", 100256: "OpenAI's cl100k_base (its special tokens are not Meta's)",
                  50256: "OpenAI's r50k_base", 50280: "OpenAI's p50k_base"}


def special_tokens() -> list:
    """Meta's 256 special tokens, in id order after the ranks."""
    reserved = (f"<|reserved_special_token_{i}|>" for i in range(2, 2 + N_SPECIAL - len(_NAMED_SPECIALS)))
    return list(_NAMED_SPECIALS) + list(reserved)


def looks_like(head: bytes) -> bool:
    """True when the first line of `head` is `base64 rank`."""
    line = head.split(b"\n", 1)[0].rstrip(b"\r")
    parts = line.split(b" ")
    if len(parts) != 2 or not parts[1].isdigit() or not parts[0]:
        return False
    try:
        base64.b64decode(parts[0], validate=True)
    except (binascii.Error, ValueError):
        return False
    return True


def read_ranks(path) -> list:
    """The token byte strings in rank order; ranks must be 0..n-1, each once."""
    path = os.fspath(path)
    buf = read_whole(path, max_bytes=MAX_TOKENIZER_FILE, what="tiktoken BPE file")
    by_rank = {}
    for number, line in enumerate(bytes(buf).split(b"\n"), 1):
        line = line.rstrip(b"\r")
        if not line:
            continue
        parts = line.split(b" ")
        if len(parts) != 2 or not parts[1].isdigit():
            raise FormatError(path, f"line {number} is not 'base64 rank' (a tiktoken BPE file)")
        try:
            token = base64.b64decode(parts[0], validate=True)
        except (binascii.Error, ValueError):
            raise FormatError(path, f"line {number}: {parts[0][:40]!r} is not base64") from None
        rank = int(parts[1])
        if not token:
            raise FormatError(path, f"line {number}: empty token")
        if rank in by_rank:
            raise FormatError(path, f"line {number}: rank {rank} appears twice")
        by_rank[rank] = token
    n = len(by_rank)
    if n == 0:
        raise FormatError(path, "empty tiktoken BPE file")
    if max(by_rank) != n - 1:
        missing = next(i for i in range(n) if i not in by_rank)
        raise FormatError(path, f"ranks are not 0..{n - 1}: rank {missing} is missing")
    tokens = [by_rank[i] for i in range(n)]
    if len(set(tokens)) != n:
        raise FormatError(path, "a token appears under two ranks")
    return tokens


def merges_from_ranks(tokens: list) -> list:
    """(left, right) byte strings of the merge that makes each multi-byte token, in rank order."""
    rank = {t: i for i, t in enumerate(tokens)}
    merges = []
    for r, token in enumerate(tokens):
        if len(token) < 2:
            continue
        parts = [token[i:i + 1] for i in range(len(token))]
        while len(parts) > 2:
            best, at = None, -1
            for i in range(len(parts) - 1):
                pr = rank.get(parts[i] + parts[i + 1])
                if pr is not None and pr < r and (best is None or pr < best):
                    best, at = pr, i
            if best is None:
                break
            parts[at:at + 2] = [parts[at] + parts[at + 1]]
        if len(parts) != 2 or parts[0] not in rank or parts[1] not in rank:
            continue  # not reachable by merges (tiktoken only finds it as a whole piece)
        merges.append((parts[0], parts[1]))
    return merges


def read(path) -> Tokenizer:
    """A Meta-format tiktoken tokenizer.model as a GGUF-style byte-level BPE vocabulary."""
    path = os.fspath(path)
    ranks = read_ranks(path)
    n = len(ranks)
    if n in _OTHER_FORMATS:
        raise UnsupportedError(path, f"a tiktoken BPE file of {n} ranks looks like {_OTHER_FORMATS[n]}, whose "
                                     "split regex or special tokens wconv does not know; only Meta's Llama 3 "
                                     "tokenizer.model format is read")
    entry = pretokenizer.identify(pretokenizer.describe_pattern("tiktoken", pretokenizer.LLAMA3_PATTERN), path)
    specials = special_tokens()
    tokens = [byte_level.encode(t).encode("utf-8") for t in ranks] + [s.encode() for s in specials]
    merges = [f"{byte_level.encode(a)} {byte_level.encode(b)}" for a, b in merges_from_ranks(ranks)]
    ids = {s: n + i for i, s in enumerate(specials)}
    return Tokenizer(model="gpt2", tokens=tokens, token_types=[NORMAL] * n + [CONTROL] * N_SPECIAL, merges=merges,
                     bos_id=ids["<|begin_of_text|>"], eos_id=ids["<|end_of_text|>"], eot_id=ids["<|eot_id|>"],
                     eom_id=ids["<|eom_id|>"], add_bos=True, add_eos=False, pre=entry.pre, kind="tiktoken",
                     source=path, files=[path])

