"""GPT-2's byte-level alphabet: every byte as one printable unicode character.

Byte-level BPE vocabularies (GPT-2, Llama 3, Qwen2; vocab.json, tokenizer.json, GGUF "gpt2")
spell tokens in this alphabet so that a token is a string even when its bytes are not UTF-8.
The printable Latin-1 bytes ('!'..'~', '¡'..'¬', '®'..'ÿ') stand for themselves; the other 68
bytes, in increasing order, become U+0100, U+0101, ... (so ' ' is 'Ġ' and '\\n' is 'Ċ').
"""
from __future__ import annotations


def _alphabet() -> list:
    own = set(range(0x21, 0x7F)) | set(range(0xA1, 0xAD)) | set(range(0xAE, 0x100))
    chars, shifted = [], 0
    for b in range(256):
        if b in own:
            chars.append(chr(b))
        else:
            chars.append(chr(0x100 + shifted))
            shifted += 1
    return chars


BYTE_TO_CHAR = _alphabet()
CHAR_TO_BYTE = {c: b for b, c in enumerate(BYTE_TO_CHAR)}


def encode(data: bytes) -> str:
    """Raw bytes -> their byte-level spelling."""
    return "".join(BYTE_TO_CHAR[b] for b in data)


def decode(text: str) -> bytes | None:
    """A byte-level spelling -> raw bytes; None when `text` uses characters outside the alphabet."""
    try:
        return bytes(CHAR_TO_BYTE[c] for c in text)
    except KeyError:
        return None
