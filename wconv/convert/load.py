"""Open any supported file or directory as a Model: sniff the format, call its reader.

Readers for single-file model formats (GGUF, GGML, llama2.c .bin, safetensors)
return a Model directly. Pickle-based torch files return an object tree whose
tensors are LazyTensors; wconv.convert.state_dict turns that into a Model by
recognising the layout (Meta, llama2.c ckpt.pt, nanoGPT, HF).
"""
from __future__ import annotations

import os

from ..errors import FormatError, UnsupportedError, WconvError
from ..model import Model

# File magics. Legacy torch files start with a pickle (protocol 2: 0x80 0x02).
ZIP_MAGIC = b"PK\x03\x04"
GGUF_MAGIC = b"GGUF"
LLAMA2C_MAGIC = b"ak42"  # uint32 0x616b3432 little-endian
GGML_MAGICS = {b"lmgg": "ggml", b"fmgg": "ggmf", b"tjgg": "ggjt"}  # uint32 magics, little-endian bytes


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
    from ..formats.llama2c import looks_like_v0

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
    from ..formats.llama2c import has_v0_header

    # A plausible v0 header whose sizes do not add up: let the llama2.c reader say what is wrong.
    return "llama2c" if has_v0_header(path) else "unknown"


def load_model(path, *, tokenizer=None, allow_unknown_globals: bool = False, strict: bool = True) -> Model:
    """Open `path` lazily. strict=False lets inspect show files whose layout is unknown."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FormatError(path, "no such file or directory")
    if os.path.isdir(path):
        from .sources import load_directory

        model = load_directory(path, allow_unknown_globals=allow_unknown_globals, strict=strict)
    else:
        fmt = sniff(path)
        model = _load_file(path, fmt, allow_unknown_globals, strict)
    if tokenizer is not None:
        model.tokenizer = load_tokenizer(tokenizer)
    elif model.tokenizer is None:
        try:
            found = find_tokenizer_beside(path)
        except WconvError as e:  # an unreadable neighbour is not the model's problem
            found = None
            model.metadata.setdefault("notes", []).append(f"ignored tokenizer.model beside the input: {e}")
        # A neighbouring tokenizer.model with more tokens than the model has rows belongs to another model.
        if found is not None and not (model.config.vocab_size and len(found.tokens) > model.config.vocab_size):
            model.tokenizer = found
            model.metadata.setdefault("notes", []).append(f"using the tokenizer found beside the input: "
                                                          f"{found.source or 'tokenizer.model'}")
    model.path = path
    return model


def _load_file(path, fmt, allow_unknown_globals, strict) -> Model:
    if fmt in ("torch-zip", "torch-legacy"):
        from .sources import load_torch_file

        return load_torch_file(path, allow_unknown_globals=allow_unknown_globals, strict=strict)
    if fmt == "gguf":
        from ..formats.gguf_io import read

        return read(path)
    if fmt == "ggml":
        from ..formats.ggml_legacy import read

        return read(path)
    if fmt == "llama2c":
        from ..formats.llama2c import read

        return read(path)
    if fmt == "safetensors":
        from .sources import load_safetensors_file

        return load_safetensors_file(path, strict=strict)
    if fmt == "sentencepiece":
        raise UnsupportedError(path, "this is a tokenizer, not a model (use tokenizer-to-bin)")
    raise FormatError(path, "unrecognised file format: not a torch checkpoint (zip or pickle), safetensors, GGUF, "
                            "GGML/GGJT, or llama2.c .bin (a v0 header must match the file size)")


def load_tokenizer(path):
    """A Tokenizer from any tokenizer file, recognised by content (wconv.vocab)."""
    from ..vocab import load_tokenizer as load

    return load(path)


def find_tokenizer_beside(path):
    """The tokenizer shipped next to a checkpoint, else None (wconv.vocab)."""
    from ..vocab import find_tokenizer_beside as find

    return find(path)
