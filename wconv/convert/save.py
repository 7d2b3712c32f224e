"""Write a Model in a chosen format: pick the writer, stream through an atomic temp file
(or, for directory formats such as `hf`, an atomic temporary directory)."""
from __future__ import annotations

import importlib
import os

from ..atomic import atomic_dir, atomic_path, check_dir_target, check_target
from .. import notes
from ..errors import UnsupportedError, UsageError, WconvError
from ..formats.gguf_io import check_vocab_fits
from ..progress import warn
from ..sniff import sniff
from ..vocab import announce as announce_tokenizer
from . import carried, out_name
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


def _preflight(model, out, fmt: str, options: dict) -> None:
    """The writer's checks, before any temporary output exists: errors name the input or OUT."""
    module = importlib.import_module(WRITERS[fmt][0])
    if not model.tensors:  # e.g. llama.cpp's vocab-only GGUF files: inspectable, not convertible
        raise UnsupportedError(model.path or None, "the model has no tensors (a vocab-only file?); nothing to convert")
    module.check_options(model, out, **{k: v for k, v in options.items() if v is not None})


def save(model, out, *, to=None, force=False, quiet=False, threads=None, **options) -> str:
    """Write `model` to `out` (format from `to` or the extension); threads: encoding threads
    (default: the machine's cores, wconv.parallel.default_workers)."""
    fmt = format_for(os.fspath(out), to)
    module_name, fn = WRITERS[fmt]
    module = importlib.import_module(module_name)
    writer = getattr(module, fn)
    options = {k: v for k, v in options.items() if v is not None}
    _preflight(model, out, fmt, options)
    target = atomic_dir if fmt in DIRECTORY_FORMATS else atomic_path
    with target(out, force=force, inputs=input_files(model), own_output=own_output(fmt)) as tmp:
        writer(model, tmp, quiet=quiet, threads=threads, **options)
    return fmt


# Options each output format takes (besides force/quiet), as CLI spellings for messages.
GGUF_CONVENIENCES = ("split_max_size", "split_max_tensors", "vocab_only", "dry_run", "name", "metadata")
MIX_OVERRIDES = ("output_tensor_type", "token_embedding_type", "pure")  # llama-quantize's, GGUF only
FORMAT_OPTIONS = {
    "gguf": ("dtype", "max_seq_len", *MIX_OVERRIDES, *GGUF_CONVENIENCES),
    "safetensors": ("dtype", "names"),
    "llama2c": ("version", "group_size", "max_seq_len"),
    "ggjt": ("dtype",),
    "hf": ("dtype", "max_seq_len", "max_shard_size"),
}


# Outputs that store a vocabulary, so --tokenizer means something (llama2c: tokenizer.bin beside it).
TOKENIZER_FORMATS = {"gguf", "ggjt", "llama2c", "hf"}


def convert(src, out, *, to=None, tokenizer=None, force=False, quiet=False, verbose=False, threads=None,
            **options) -> str:
    """Read SRC, say what OUT cannot hold, check every option, then write OUT (and tokenizer.bin)."""
    with notes.verbose(verbose):
        if threads is not None and threads < 1:
            raise UsageError(out, f"--threads must be at least 1, got {threads}")
        return _convert(src, out, to=to, tokenizer=tokenizer, force=force, quiet=quiet, threads=threads,
                        **options)


def _convert(src, out, *, to=None, tokenizer=None, force=False, quiet=False, threads=None, **options) -> str:
    fmt = format_for(os.fspath(out), to)
    given = {k: v for k, v in options.items() if v is not None and v is not False}
    for name in given:
        if name not in FORMAT_OPTIONS[fmt]:
            hint = "; use --version 2 for int8" if (fmt, name) == ("llama2c", "dtype") else ""
            raise UsageError(out, f"--{name.replace('_', '-')} does not apply to {fmt} output{hint}")
    if tokenizer is not None and fmt not in TOKENIZER_FORMATS:
        raise UsageError(out, f"--tokenizer does not apply to {fmt} output (it holds no vocabulary); "
                              f"formats that take one: {', '.join(sorted(TOKENIZER_FORMATS))}")
    if given.get("max_seq_len") is not None and given["max_seq_len"] < 1:
        raise UsageError(out, f"--max-seq-len must be at least 1, got {given['max_seq_len']}")
    if fmt != "gguf":
        out_name.refuse_template(out, fmt)
    options = given
    if fmt == "safetensors":
        names = options.pop("names", None) or ("stored" if _is_torch_file(src) else "canonical")
        if names == "stored":
            return mirror(src, out, force=force, quiet=quiet, **options)
    model = load_model(src, tokenizer=tokenizer)
    if carried.carries_vocabulary(fmt, tokenizer_given=tokenizer is not None):
        announce_tokenizer(model)  # (otherwise the warning that it is not carried names it)
    if carried.dropped_tokenizer(model):
        warn(model.path, carried.dropped_tokenizer(model))
    if fmt == "gguf":
        return _convert_gguf(model, out, force=force, quiet=quiet, threads=threads,
                             tokenizer_given=tokenizer is not None,
                             **options)
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
        emb = model.get("token_embd.weight")
        if emb is not None:
            check_vocab_fits(model.tokenizer, emb.shape[0], model.path)
    _preflight(model, out, fmt, options)
    check = check_dir_target if fmt in DIRECTORY_FORMATS else check_target
    check(out, force=force, inputs=input_files(model), own_output=own_output(fmt))  # before the warnings below
    for line in carried.losses(model, fmt, tokenizer_given=tokenizer is not None):
        warn(model.path, line)
    save(model, out, to=fmt, force=force, quiet=quiet, threads=threads, **options)
    if tok_out is not None:
        write_tokenizer_bin(tokenizer, tok_out, force=force, loaded=model.tokenizer)
    return fmt


def _is_torch_file(path) -> bool:
    return os.path.isfile(path) and sniff(path) in ("torch-zip", "torch-legacy")


def mirror(src, out, *, force=False, quiet=False, dtype=None) -> str:
    """`convert SRC OUT.safetensors` for a torch file: its state dict exactly as stored (wconv.convert.mirror)."""
    from .mirror import plan_mirror, write_mirror

    if not _is_torch_file(src):
        what = sniff(src) if os.path.isfile(src) else "directory" if os.path.isdir(src) else "missing file"
        raise UsageError(src, f"--names stored mirrors a torch checkpoint file (.pt/.pth/.bin/.ckpt), not a {what}; "
                              "use --names canonical")
    if dtype is not None:
        raise UsageError(out, "--dtype would change the stored values, and the safetensors mirror of a torch file "
                              "keeps them exactly; add --names canonical to convert through wconv's model view")
    plan = plan_mirror(src)
    with atomic_path(out, force=force, inputs=[src], own_output=own_output("safetensors")) as tmp:
        write_mirror(plan, tmp, quiet=quiet)
    for line in plan.notes():
        warn(src, line)
    return "safetensors"


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


def _convert_gguf(model, out, *, force=False, quiet=False, threads=None, tokenizer_given=False, dtype=None, max_seq_len=None,
                  split_max_size=None, split_max_tensors=None, vocab_only=False, dry_run=False, name=None,
                  metadata=None, output_tensor_type=None, token_embedding_type=None, pure=False) -> str:
    """GGUF output with llama.cpp's converter conveniences: OUT templates ({ftype}, {name}),
    --name/--metadata, --vocab-only, --split-max-size/--split-max-tensors, --dry-run."""
    from .. import gguf_meta, gguf_split
    from ..atomic import scratch_file
    from ..formats import gguf_io

    where = model.path or os.fspath(out)
    if not model.tensors:
        raise UnsupportedError(model.path or None, "the model has no tensors (a vocab-only file?); nothing to convert")
    overrides = gguf_meta.overrides(metadata, name)
    mix = dict(output_tensor_type=output_tensor_type, token_embedding_type=token_embedding_type, pure=pure)
    plan = gguf_io.plan(model, where, dtype=dtype, max_seq_len=max_seq_len,
                        overrides=gguf_io.mix_overrides(out, dtype, **mix))
    if vocab_only and model.tokenizer is None:
        raise UsageError(where, "--vocab-only: the model has no vocabulary to write; pass --tokenizer")
    model_name = overrides["general.name"][1] if "general.name" in overrides else gguf_io._model_name(model)
    out = out_name.fill(os.fspath(out), ftype=out_name.ftype_name(plan.file_type(model, dtype)), name=model_name)
    max_bytes = gguf_split.parse_size(split_max_size) if split_max_size is not None else None
    sizes = [] if vocab_only else [plan.types.types[n].nbytes(t.n_elements) for n, t in plan.tensors.items()]
    splitting = max_bytes is not None or split_max_tensors is not None
    groups = gguf_split.plan_split(sizes, max_bytes, split_max_tensors) if splitting else [list(range(len(sizes)))]
    paths = gguf_split.output_paths(out, len(groups), single=out)
    _preflight(model, out, "gguf", dict(dtype=dtype, max_seq_len=max_seq_len, **mix))
    inputs = input_files(model)
    for p in paths:  # refuse before the warnings and the long write, not after
        check_target(p, force=force, inputs=inputs, own_output=own_output("gguf"))
    for line in carried.losses(model, "gguf", tokenizer_given=tokenizer_given):
        warn(model.path, line)
    if dry_run:
        print(out_name.describe(model, plan, groups, sizes, paths, vocab_only=vocab_only, overrides=overrides))
        return "gguf"
    write_options = dict(dtype=dtype, max_seq_len=max_seq_len, vocab_only=vocab_only, metadata_overrides=overrides,
                         threads=threads, **mix)
    if len(paths) == 1:
        save(model, out, to="gguf", force=force, quiet=quiet, **write_options)
        return "gguf"
    with scratch_file(paths[0]) as single:
        gguf_io.write(model, single, quiet=quiet, **write_options)
        gguf_split.split(single, out, max_bytes=max_bytes, max_tensors=split_max_tensors, force=force,
                         quiet=quiet, inputs=inputs)
    return "gguf"
