"""What format a file is in, from its first bytes (and size): the one sniffer load, scan and
inspect share. A leaf: it imports no reader that could import it back."""
from __future__ import annotations

import os

from .errors import FormatError

# File magics. Legacy torch files start with a pickle (protocol 2: 0x80 0x02).
ZIP_MAGIC = b"PK\x03\x04"
GGUF_MAGIC = b"GGUF"
LLAMA2C_MAGIC = b"ak42"  # uint32 0x616b3432 little-endian
GGML_MAGICS = {b"lmgg": "ggml", b"fmgg": "ggmf", b"tjgg": "ggjt"}  # uint32 magics, little-endian bytes

# What each kind of file is, for messages ("X is <this>"): the formats sniff() names and the
# tokenizer kinds wconv.vocab recognises.
WHAT = {
    "sentencepiece": "a sentencepiece tokenizer.model",
    "tiktoken": "a tiktoken BPE file (Meta's Llama 3 style tokenizer.model)",
    "hf-tokenizer-json": "a Hugging Face tokenizer.json",
    "gpt2-vocab-json": "a GPT-2 style vocab.json / encoder.json",
    "bpe-merges": "a BPE merges file (merges.txt / vocab.bpe)",
    "llama2c-tokenizer": "a llama2.c tokenizer.bin",
    "hf-tokenizer-config": "a Hugging Face tokenizer_config.json (settings only, no vocabulary)",
    "hf-generation-config": "a Hugging Face generation_config.json (no vocabulary)",
    "gguf": "a GGUF file", "gpt2-vocab": "a GPT-2 style vocab.json / encoder.json + merges pair",
    "torch-zip": "a torch checkpoint (zip)", "torch-legacy": "a torch checkpoint (legacy pickle)",
    "safetensors": "a safetensors file", "ggml": "a GGML/GGJT model", "llama2c": "a llama2.c model .bin",
    "json": "a JSON file that is not a tokenizer", "directory": "a directory", "empty": "an empty file",
    "unknown": "not a tokenizer file wconv knows",
}


def sniff(path: str) -> str:
    """Name of the format of file `path` from its first bytes (and size)."""
    try:
        with open(path, "rb") as f:
            head = f.read(16)
    except IsADirectoryError:
        return "directory"
    except OSError as e:
        raise FormatError(path, f"cannot read: {e.strerror or e}") from None
    if len(head) == 0:
        raise FormatError(path, "file is empty")
    if head.startswith(ZIP_MAGIC) or head.startswith(b"PK\x05\x06"):
        return "torch-zip"
    if head.startswith(GGUF_MAGIC):
        return "gguf"
    if head[:4] == LLAMA2C_MAGIC[::-1]:
        return "llama2c"
    if head[:4] in GGML_MAGICS:
        return "ggml"
    # llama2.c v0 has no magic and its first int (dim, e.g. 128 = 0x80) can look like a pickle
    # opcode; its header must match the file size exactly, which nothing else does by accident.
    from .formats.llama2c import looks_like_v0

    if looks_like_v0(path):
        return "llama2c"
    # safetensors before the pickle test: its first byte is the header length's low byte,
    # which can be 0x80 or '(' too; a '{' after a length that fits the file is safetensors.
    if len(head) >= 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") + 8 <= os.path.getsize(path):
        return "safetensors"
    if head[:1] == b"\x80" or head[:1] in (b"(", b"}", b"]", b"c"):
        return "torch-legacy"
    if len(head) >= 9 and head[8:9] == b"{":
        return "safetensors"  # truncated: the reader says so
    if path.endswith(".model"):
        return "sentencepiece"
    from .formats.llama2c import has_v0_header

    # A plausible v0 header whose sizes do not add up: let the llama2.c reader say what is wrong.
    return "llama2c" if has_v0_header(path) else "unknown"


