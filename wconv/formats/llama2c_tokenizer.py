"""llama2.c's tokenizer.bin: read and write.

Layout (llama2.c tokenizer.py export, run.c build_tokenizer), little-endian:
uint32 max_token_length, then for every token: float32 score, int32 byte
length, the bytes (no terminator). The vocabulary size is not stored: run.c
takes it from the model header; a reader counts records to the end of file.

Pieces are transformed on the way out as llama2.c does: the BOS piece becomes
"\\n<s>\\n", the EOS piece "\\n</s>\\n", and every '▁' (U+2581) becomes a space.
Byte-fallback pieces stay as text ('<0x0A>'); run.c parses them when decoding.
`read` undoes the transformation (space -> '▁', the BOS/EOS markers -> '<s>' /
'</s>'), so read then write reproduces the file byte for byte. The file has
no token types: `read` infers them (markers: CONTROL, '<0xXX>': BYTE, '<unk>':
UNKNOWN, others NORMAL).
"""
from __future__ import annotations

import os
import re
import struct

from ..errors import FormatError, UnsupportedError
from ..mapped import MAX_TOKENIZER_FILE, read_whole
from ..model import Tokenizer
from ..sniff import WHAT

SPACE_MARK = "\u2581".encode("utf-8")
BOS_TEXT, EOS_TEXT = b"\n<s>\n", b"\n</s>\n"
_BYTE_PIECE = re.compile(rb"^<0x[0-9A-Fa-f]{2}>$")
MAX_TOKEN_BYTES = 1 << 16  # sanity bound on one token (real ones are < 100 bytes)


def export_pieces(tokenizer: Tokenizer) -> list[bytes]:
    """The byte strings llama2.c writes for each token."""
    out = []
    for i, piece in enumerate(tokenizer.tokens):
        piece = bytes(piece)
        if i == tokenizer.bos_id:
            piece = BOS_TEXT
        elif i == tokenizer.eos_id:
            piece = EOS_TEXT
        out.append(piece.replace(SPACE_MARK, b" "))
    return out


def check_writable(tokenizer: Tokenizer) -> None:
    """Refuse, before anything is written, a vocabulary tokenizer.bin cannot hold."""
    if tokenizer.model != "llama":
        what = WHAT.get(tokenizer.kind, "a vocabulary")
        raise UnsupportedError(tokenizer.source or None, f"is {what} holding a byte-level BPE vocabulary "
                                                         f"({tokenizer.model!r}): llama2.c's tokenizer.bin holds only "
                                                         "sentencepiece-style vocabularies (run.c merges pieces by "
                                                         "score; it has no byte-level BPE)")


def write(tokenizer: Tokenizer, tmp_path) -> None:
    check_writable(tokenizer)
    pieces = export_pieces(tokenizer)
    if not pieces:
        raise UnsupportedError(tokenizer.source or None, "the tokenizer has no tokens")
    scores = tokenizer.scores if tokenizer.scores is not None else [0.0] * len(pieces)
    if len(scores) != len(pieces):
        raise FormatError(tokenizer.source or None, f"{len(pieces)} tokens but {len(scores)} scores")
    with open(tmp_path, "wb") as f:
        f.write(struct.pack("<I", max(len(p) for p in pieces)))
        for piece, score in zip(pieces, scores):
            f.write(struct.pack("<fi", score, len(piece)))
            f.write(piece)


def read(path) -> Tokenizer:
    path = os.fspath(path)
    buf = read_whole(path, max_bytes=MAX_TOKENIZER_FILE, what="llama2.c tokenizer.bin")
    if len(buf) < 4:
        raise FormatError(path, "too short for a llama2.c tokenizer.bin")
    (max_len,) = struct.unpack_from("<I", buf, 0)
    if not 0 < max_len <= MAX_TOKEN_BYTES:
        raise FormatError(path, f"not a llama2.c tokenizer.bin: max_token_length {max_len}")
    pos, raw, scores = 4, [], []
    while pos < len(buf):
        if pos + 8 > len(buf):
            raise FormatError(path, f"truncated record for token {len(raw)} at offset {pos}")
        score, n = struct.unpack_from("<fi", buf, pos)
        pos += 8
        if n < 0 or n > max_len:
            raise FormatError(path, f"token {len(raw)} has length {n} (max_token_length {max_len})")
        if pos + n > len(buf):
            raise FormatError(path, f"token {len(raw)} runs past the end of the file")
        raw.append(buf[pos:pos + n])
        scores.append(score)
        pos += n
    tokens, types, bos, eos = [], [], None, None
    for i, piece in enumerate(raw):
        if piece == BOS_TEXT and bos is None:
            bos, piece, kind = i, b"<s>", 3
        elif piece == EOS_TEXT and eos is None:
            eos, piece, kind = i, b"</s>", 3
        elif _BYTE_PIECE.match(piece):
            kind = 6
        elif piece == b"<unk>":
            kind = 2
        else:
            kind, piece = 1, piece.replace(b" ", SPACE_MARK)
        tokens.append(piece)
        types.append(kind)
    unk = tokens.index(b"<unk>") if b"<unk>" in tokens else None
    return Tokenizer(model="llama", tokens=tokens, scores=scores, token_types=types, bos_id=bos, eos_id=eos,
                     unk_id=unk, add_bos=True if bos is not None else None, pre="default", kind="llama2c-tokenizer",
                     source=path, files=[path])
