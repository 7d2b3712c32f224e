"""Write a Model in a chosen format: pick the writer, stream through an atomic temp file
(or, for directory formats such as `hf`, an atomic temporary directory)."""
from __future__ import annotations

import importlib
import os

from ..atomic import atomic_dir, atomic_path, check_target
from ..errors import UnsupportedError, UsageError, WconvError
from ..sniff import sniff
from ..vocab import announce as announce_tokenizer
from .load import load_model, load_tokenizer

# format -> (module, writer function). Every writer: fn(model, tmp_path, *, progress_quiet, **options).
WRITERS = {
    "gguf": ("wconv.formats.gguf_io", "write"),
    "safetensors": ("wconv.formats.safetensors_io", "write"),
    "llama2c": ("wconv.formats.llama2c", "write"),
    "ggjt": ("wconv.formats.ggml_legacy", "write_ggjt"),
    "hf": ("wconv.formats.hf_dir", "write"),  # a directory; only by --to hf
}
DIRECTORY_FORMATS = {"hf"}
EXTENSIONS = {".gguf": "gguf", ".safetensors": "safetensors", ".bin": "llama2c", ".ggjt": "ggjt"}


def format_for(out: str, to: str | None) -> str:
    if to:
        return to
    ext = os.path.splitext(out)[1].lower()
    if ext not in EXTENSIONS:
        raise UsageError(out, f"cannot tell the output format from extension {ext or '(none)'!r}; pass --to "
                              "(--to hf for a Hugging Face model directory)")
    return EXTENSIONS[ext]


def input_files(model) -> list:
    """Paths the model was read from (never to be overwritten), its tokenizer file included."""
    paths = [model.path] if model.path else []
    paths += model.metadata.get("_input_files", [])
    source = getattr(model.tokenizer, "source", None)
    if source and os.path.isfile(source):  # tokenizer.model found beside the model, or --tokenizer
        paths.append(source)
    return paths


# sniff() names of the file formats, to recognise a previous output that --force may replace.
_SNIFFED = {"gguf": "gguf", "safetensors": "safetensors", "llama2c": "llama2c", "ggjt": "ggml"}


def own_output(fmt: str):
    """The recogniser atomic_path/atomic_dir use before --force replaces an existing OUT."""
    if fmt in DIRECTORY_FORMATS:
        return importlib.import_module(WRITERS[fmt][0]).own_output

    def check(path):
        try:
            found = sniff(path)
        except WconvError:
            found = "unreadable"
        return None if found == _SNIFFED[fmt] else f"it is not a {fmt} file (it looks like: {found})"
    return check


def save(model, out, *, to=None, force=False, quiet=False, threads=None, **options) -> str:
    """Write `model` to `out` (format from `to` or the extension); threads: encoding threads
    (default: the machine's cores, wconv.parallel.default_workers)."""
    fmt = format_for(os.fspath(out), to)
    module_name, fn = WRITERS[fmt]
    module = importlib.import_module(module_name)
    writer = getattr(module, fn)
    options = {k: v for k, v in options.items() if v is not None}
    if not model.tensors:  # e.g. llama.cpp's vocab-only GGUF files: inspectable, not convertible
        raise UnsupportedError(model.path or None, "the model has no tensors (a vocab-only file?); nothing to convert")
    if hasattr(module, "check_options"):  # refuse bad options naming OUT, before any temporary exists
        module.check_options(model, out, **options)
    target = atomic_dir if fmt in DIRECTORY_FORMATS else atomic_path
    with target(out, force=force, inputs=input_files(model), own_output=own_output(fmt)) as tmp:
        writer(model, tmp, quiet=quiet, threads=threads, **options)
    return fmt


# Options each output format takes (besides force/quiet), as CLI spellings for messages.
FORMAT_OPTIONS = {
    "gguf": ("dtype", "max_seq_len"),
    "safetensors": ("dtype",),
    "llama2c": ("version", "group_size", "max_seq_len"),
    "ggjt": ("dtype",),
    "hf": ("dtype", "max_seq_len", "max_shard_size"),
}


# Outputs that store a vocabulary, so --tokenizer means something (llama2c: tokenizer.bin beside it).
TOKENIZER_FORMATS = {"gguf", "ggjt", "llama2c", "hf"}


def convert(src, out, *, to=None, tokenizer=None, force=False, quiet=False, threads=None, **options) -> str:
    fmt = format_for(os.fspath(out), to)
    given = {k: v for k, v in options.items() if v is not None}
    for name in given:
        if name not in FORMAT_OPTIONS[fmt]:
            hint = "; use --version 2 for int8" if (fmt, name) == ("llama2c", "dtype") else ""
            raise UsageError(out, f"--{name.replace('_', '-')} does not apply to {fmt} output{hint}")
    if tokenizer is not None and fmt not in TOKENIZER_FORMATS:
        raise UsageError(out, f"--tokenizer does not apply to {fmt} output (it holds no vocabulary); "
                              f"formats that take one: {', '.join(sorted(TOKENIZER_FORMATS))}")
    if given.get("max_seq_len") is not None and given["max_seq_len"] < 1:
        raise UsageError(out, f"--max-seq-len must be at least 1, got {given['max_seq_len']}")
    options = given
    model = load_model(src, tokenizer=tokenizer)
    announce_tokenizer(model)
    tok_out = None
    if fmt == "llama2c" and tokenizer is not None:
        # pth-to-bin --tokenizer: tokenizer.bin beside the model, checked before anything is written.
        tok_out = os.path.join(os.path.dirname(os.path.abspath(out)), "tokenizer.bin")
        if os.path.abspath(out) == tok_out:
            raise UsageError(out, "with --tokenizer, tokenizer.bin is written beside the model: name the model "
                                  "something else")
        check_target(tok_out, force=force, inputs=[tokenizer, *input_files(model)], own_output=_own_tokenizer_bin)
        from ..formats.llama2c_tokenizer import check_writable

        check_writable(model.tokenizer)
    if threads is not None and threads < 1:
        raise UsageError(out, f"--threads must be at least 1, got {threads}")
    save(model, out, to=fmt, force=force, quiet=quiet, threads=threads, **options)
    if tok_out is not None:
        write_tokenizer_bin(tokenizer, tok_out, force=force, loaded=model.tokenizer)
    return fmt


def write_tokenizer_bin(src, out, *, force=False, loaded=None):
    """tokenizer.bin from tokenizer file `src` (`loaded`: that file already read, not read again)."""
    from ..formats.llama2c_tokenizer import write

    tok = loaded if loaded is not None else load_tokenizer(src)
    with atomic_path(out, force=force, inputs=[src], own_output=_own_tokenizer_bin) as tmp:
        write(tok, tmp)


def _own_tokenizer_bin(path):
    from ..formats.llama2c_tokenizer import read

    try:
        read(path)
    except WconvError:
        return "it is not a llama2.c tokenizer.bin"
    return None
