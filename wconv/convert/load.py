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
from ..sniff import sniff

def load_model(path, *, tokenizer=None, allow_unknown_globals: bool = False, strict: bool = True) -> Model:
    """Open `path` lazily. strict=False lets inspect show files whose layout is unknown."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FormatError(path, "no such file or directory")
    if os.path.isdir(path):
        from .sources import load_directory, resolve_directory

        kind, single = resolve_directory(path)
        if kind == "file":  # a directory holding one model file: that file
            model = _load_file(single, sniff(single), allow_unknown_globals, strict)
        else:
            model = load_directory(path, kind, allow_unknown_globals=allow_unknown_globals, strict=strict)
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

        return read(path, strict=strict)
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
    """A Tokenizer from a sentencepiece tokenizer.model or a llama2.c tokenizer.bin."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FormatError(path, "tokenizer file not found")
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError as e:
        raise FormatError(path, f"cannot read tokenizer: {e.strerror or e}") from None
    # protobuf: field 1 (pieces, wire type 2), a length, then the piece's own field 1 tag.
    # A tokenizer.bin whose max_token_length is 10 also starts with 0x0a, but then zeros.
    if head[:1] == b"\x0a" and b"\x0a" in head[2:4]:
        from ..formats.sentencepiece import read

        return read(path)
    from ..formats.llama2c_tokenizer import read

    return read(path)


def find_tokenizer_beside(path):
    """tokenizer.model found next to a checkpoint (Meta and HF ship one), else None.

    For a model directory its parent is searched too: Meta's downloads put tokenizer.model
    beside the llama-2-7b/ folders.
    """
    if os.path.isdir(path):
        directory = os.path.abspath(path)
        places = (directory, os.path.dirname(directory))
    else:
        places = (os.path.dirname(os.path.abspath(path)),)
    for parent in places:
        candidate = os.path.join(parent, "tokenizer.model")
        if os.path.isfile(candidate):
            return load_tokenizer(candidate)
    return None
