"""GGUF output names with templates, and the --dry-run plan text.

Templates are llama.cpp's converter's (gguf-py fill_templated_filename): in OUT's file name,
`{ftype}` / `{outtype}` become the output type in lower case (f32, f16, bf16, q8_0, q4_0;
without --dtype the type most weights keep, e.g. `f16`), `{FTYPE}` / `{OUTTYPE}` the same
in upper case, a bare `{}` the lower-case type. wconv adds `{name}`: the model name
(general.name after --name / --metadata), spaces and slashes turned into '-' as in
llama.cpp's file-naming convention. `{{` and `}}` are literal braces.
"""
from __future__ import annotations

import os
import string

from ..errors import UsageError

FIELDS = ("ftype", "outtype", "FTYPE", "OUTTYPE", "name", "")


def has_template(out: str) -> bool:
    try:
        return any(f is not None for _, f, _, _ in string.Formatter().parse(os.path.basename(out)))
    except ValueError:
        return "{" in os.path.basename(out) or "}" in os.path.basename(out)


def refuse_template(out: str, fmt: str) -> None:
    if has_template(out):
        raise UsageError(out, f"output name templates ({{ftype}}, {{name}}) apply to GGUF output, not {fmt}")


def ftype_name(file_type: int) -> str:
    """'q8_0' for llama_ftype MOSTLY_Q8_0 (convert_hf_to_gguf: the part after the first '_')."""
    from gguf import LlamaFileType

    try:
        return LlamaFileType(file_type).name.partition("_")[2].lower() or "unknown"
    except ValueError:
        return "unknown"


def fill(out: str, *, ftype: str, name: str) -> str:
    """OUT with the template fields of its file name filled in (the directory is left alone)."""
    directory, base = os.path.split(out)
    if "{" not in base and "}" not in base:
        return out
    safe = name.strip().replace(" ", "-").replace("/", "-").replace(os.sep, "-") or "model"
    for _, field, spec, conv in string.Formatter().parse(base):
        if field is not None and (field not in FIELDS or spec or conv):
            raise UsageError(out, f"unknown output name template {{{field}{'!' + conv if conv else ''}"
                                  f"{':' + spec if spec else ''}}}; use {{ftype}}, {{FTYPE}}, {{outtype}} or "
                                  "{name} (and {{ or }} for a literal brace)")
    try:
        filled = base.format(ftype, ftype=ftype, outtype=ftype, FTYPE=ftype.upper(), OUTTYPE=ftype.upper(),
                             name=safe)
    except (IndexError, KeyError, ValueError) as e:
        raise UsageError(out, f"cannot fill the output name template: {e}") from None
    return os.path.join(directory, filled)


def describe(model, plan, groups: list, sizes: list, paths: list, *, vocab_only: bool, overrides: dict) -> str:
    """The --dry-run report: output files, per-tensor type and size, metadata, warnings."""
    lines = [f"dry run: nothing written", f"input: {model.path} ({model.source_format}, {model.config.arch})"]
    total = sum(sizes)
    lines.append(f"output: {len(paths)} file(s), {total:,} bytes of tensor data"
                 + (" (vocabulary and hyperparameters only)" if vocab_only else ""))
    for path, group in zip(paths, groups):
        lines.append(f"  {path}: {len(group)} tensors, {sum(sizes[i] for i in group):,} bytes")
    if overrides:
        lines.append("metadata: " + ", ".join(f"{k}={v!r}" for k, (_, v) in overrides.items()))
    if not vocab_only:
        lines.append("tensors:")
        width = max((len(n) for n in plan.tensors), default=0)
        for (n, t), size in zip(plan.tensors.items(), sizes):
            out_type = plan.types.types[n].name
            lines.append(f"  {n:<{width}}  {str(list(t.shape)):<16} {t.dtype.name:>5} -> {out_type:<5} {size:>14,}")
    notes = ([] if vocab_only else list(plan.types.notes)) + list(plan.notes)
    if model.tokenizer is None:
        notes.append("no tokenizer: the GGUF would hold tokenizer.ggml.model = 'no_vocab' (pass --tokenizer)")
    lines += [f"warning: {n}" for n in notes]
    return "\n".join(lines)
