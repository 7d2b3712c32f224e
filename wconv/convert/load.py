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
            _drop_tokenizer(model, f"ignored the tokenizer file beside it: {e}")
        # A neighbouring tokenizer with more tokens than the model has rows belongs to another model.
        if found is not None and model.config.vocab_size and len(found.tokens) > model.config.vocab_size:
            _drop_tokenizer(model, f"ignored the tokenizer beside it, {found.source}: it has {len(found.tokens)} "
                                   f"tokens but the model only {model.config.vocab_size} embedding rows, so it "
                                   "belongs to another model; the output gets no vocabulary from it (pass "
                                   "--tokenizer to give the right one)")
        elif found is not None:
            model.tokenizer = found
            model.metadata.setdefault("notes", []).append(f"using the tokenizer found beside the input: "
                                                          f"{found.source or 'tokenizer.model'}")
    model.path = path
    return model


def _drop_tokenizer(model, why: str) -> None:
    """Record why a tokenizer beside the input is not used: a note for inspect, a warning on convert."""
    model.metadata.setdefault("notes", []).append(why)
    model.metadata["_dropped_tokenizer"] = why


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
    """A Tokenizer from any tokenizer file, recognised by content (wconv.vocab)."""
    from ..vocab import load_tokenizer as load

    return load(path)


def find_tokenizer_beside(path):
    """The tokenizer shipped next to a checkpoint, else None (wconv.vocab)."""
    from ..vocab import find_tokenizer_beside as find

    return find(path)
