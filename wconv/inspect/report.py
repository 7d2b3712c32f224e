"""`wconv inspect`: what a file or directory holds, without reading tensor data.

inspect_path() returns the JSON contract described in docs/inspect-json.md;
format_text() renders the same report for people.
"""
from __future__ import annotations

import json
import math
import os

from ..convert.state_dict import summarise
from ..model import Stored

REPORT_VERSION = 2  # 2: tensors are the file view (stored names, dtypes, shapes, offsets)
MAX_METADATA_CHARS = 64_000  # the metadata section is summarised further beyond this


def _bounded_metadata(metadata: dict) -> dict:
    """Metadata minus internal keys, summarised until its JSON fits MAX_METADATA_CHARS."""
    visible = {k: v for k, v in metadata.items() if not k.startswith("_")}
    for max_items, max_depth, max_str in ((32, 8, 300), (8, 4, 120), (4, 2, 60)):
        out = summarise(visible, max_items=max_items, max_depth=max_depth, max_str=max_str)
        if not isinstance(out, dict):
            out = {"metadata": out}
        if len(json.dumps(out)) <= MAX_METADATA_CHARS:
            return out
    return {"summary": f"{len(visible)} entries (too large to show)", "keys": sorted(map(str, visible))[:64]}


def _tokenizer_summary(tok):
    from ..vocab import summary

    return summary(tok)


def _stored_entries(model) -> list:
    """The file view: every stored tensor as the file holds it, with its model-view name beside it."""
    stored = model.stored or [Stored(model.path, n, t, n) for n, t in model.tensors.items()]
    single = len({s.file for s in stored}) <= 1
    gguf = model.source_format.startswith("gguf")
    out = []
    for s in stored:
        t = s.tensor
        view = model.tensors.get(s.canonical) if s.canonical else None
        span = t.file_span() if hasattr(t, "file_span") else None
        entry = {"name": s.name, "dtype": _stored_dtype(model, s), "shape": list(t.shape),
                 "n_params": t.n_elements, "nbytes": t.nbytes,
                 "offset": span[1] if span else None,
                 "file": None if single else os.fspath(s.file),
                 "canonical_name": s.canonical if view is not None else None,
                 "canonical_shape": list(view.shape) if view is not None else None}
        if gguf:
            entry["ggml_shape"] = list(reversed(t.shape))  # GGML's dimension order, as gguf-dump prints it
        if s.note:
            entry["note"] = s.note
        out.append(entry)
    return out


def _stored_dtype(model, s) -> str:
    if s.note.startswith("int8 groups"):  # llama2.c v2: dequantised on read
        return f"LLAMA2C_Q8/g{model.metadata.get('group_size')}"
    return s.tensor.dtype.name


def report_for(model) -> dict:
    """The inspect report of an already opened Model (reads no tensor data)."""
    tensors = _stored_entries(model)
    return {
        "report_version": REPORT_VERSION,
        "path": model.path,
        "format": model.source_format,
        "layout": model.source_layout,
        "arch": model.config.arch,
        "arch_source": model.metadata.get("_arch_source", ""),
        # strict JSON: a non-finite value read from a file (e.g. a GGUF epsilon) becomes a string
        "config": {k: (v if not isinstance(v, float) or math.isfinite(v) else str(v))
                   for k, v in model.config.to_dict().items()},
        "n_tensors": len(tensors),
        "n_params": sum(t["n_params"] for t in tensors),
        "n_bytes": sum(t["nbytes"] for t in tensors),
        "dtypes": _dtype_counts(tensors),
        "tensors": tensors,
        "tokenizer": _tokenizer_summary(model.tokenizer),
        "input_files": input_files(model),
        "metadata": _bounded_metadata(model.metadata),
    }


def input_files(model) -> list:
    """Every file the model was read from: weights, side files, and a tokenizer file (given or found)."""
    files = [os.fspath(p) for p in model.metadata.get("_input_files", [])]
    source = getattr(model.tokenizer, "source", None)
    if source and os.path.isfile(source) and source not in files:
        files.append(os.fspath(source))
    return files


def _dtype_counts(tensors) -> dict:
    counts = {}
    for t in tensors:
        counts[t["dtype"]] = counts.get(t["dtype"], 0) + 1
    return counts


def inspect_path(path, *, allow_unknown_globals: bool = False, stats: bool = False, quiet: bool = True) -> dict:
    """The report; with stats=True each tensor also gets value statistics (reads all tensor data)."""
    from ..convert.load import load_model
    from ..vocab import as_model

    model = as_model(path)  # a tokenizer file: a report with no tensors and its tokenizer section
    if model is None:
        model = load_model(path, allow_unknown_globals=allow_unknown_globals, strict=False)
    report = report_for(model)
    if stats:
        from ..progress import progress
        from .stats import tensor_stats

        stored = model.stored or [Stored(model.path, n, t, n) for n, t in model.tensors.items()]
        with progress(sum(s.tensor.nbytes for s in stored), "statistics", quiet=quiet) as bar:
            for entry, s in zip(report["tensors"], stored):
                entry["stats"] = tensor_stats(s.tensor)
                bar.update(s.tensor.nbytes, s.name)
    return report


# --- text rendering ----------------------------------------------------------------------

def _human_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def _human_count(n: int) -> str:
    for div, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= div:
            return f"{n / div:.2f}{suffix}"
    return str(n)


_CONFIG_FIELDS = {
    "llama": ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "hidden_dim", "max_seq_len",
              "norm_eps", "rope_theta", "tie_embeddings"),
    "gpt2": ("dim", "n_layers", "n_heads", "vocab_size", "hidden_dim", "max_seq_len", "norm_eps",
             "tie_embeddings", "bias", "gelu"),
}
_SHOWN_WHEN_SET = ("head_width", "rope_scaling", "sliding_window")  # rotary families, when not default


def format_text(report: dict) -> str:
    lines = [f"path:    {report.get('path', '')}",
             f"format:  {report.get('format', '')}",
             f"layout:  {report.get('layout', '')}",
             f"arch:    {report.get('arch', '')}"
             + (f" ({report['arch_source']})" if report.get("arch_source") else "")]
    cfg = report.get("config") or {}
    arch_name = report.get("arch")
    fields = _CONFIG_FIELDS.get(arch_name)
    if arch_name not in (None, "unknown", "gpt2"):  # the rotary families
        fields = _CONFIG_FIELDS["llama"] + tuple(k for k in _SHOWN_WHEN_SET if (report.get("config") or {}).get(k))
    if (report.get("metadata") or {}).get("vocab_only"):
        lines.append("contents: a vocabulary only (no tensors, no hyperparameters)")
    elif fields:
        lines.append("hyperparameters:")
        for k in fields:
            value = cfg.get(k)
            shown = "unknown" if value == 0 and k in ("n_heads", "n_kv_heads") else value
            lines.append(f"  {k:<15} {shown}")
    tok = report.get("tokenizer")
    if tok:
        from ..vocab import format_summary

        lines += format_summary(tok)
    lines += ["", _tensor_table(report.get("tensors") or [])]
    lines += [f"no statistics for {t['name']}: {t['stats']['error']}" for t in report.get("tensors") or []
              if "error" in t.get("stats", {})]
    lines.append(f"total: {report.get('n_tensors', 0)} tensors, {report.get('n_params', 0):,} params "
                 f"({_human_count(report.get('n_params', 0))}), {_human_bytes(report.get('n_bytes', 0))}"
                 + (f"; dtypes {', '.join(f'{k} x{v}' for k, v in report.get('dtypes', {}).items())}"
                    if report.get("dtypes") else ""))
    meta = report.get("metadata") or {}
    if meta:
        lines += ["", "non-tensor entries:"]
        for k, v in meta.items():
            text = json.dumps(v, separators=(", ", ": "))
            if len(text) > 200:
                text = text[:197] + "..."
            lines.append(f"  {k}: {text}")
    return "\n".join(lines)


_STAT_COLUMNS = ("min", "max", "mean", "std", "nan", "inf", "zeros")


def _stat_cells(stats: dict) -> tuple:
    if "error" in stats:  # the reason is printed below the table
        return ("n/a",) + ("-",) * (len(_STAT_COLUMNS) - 1)
    return tuple("-" if stats[k] is None else (f"{stats[k]:.4g}" if isinstance(stats[k], float) else f"{stats[k]:,}")
                 for k in _STAT_COLUMNS)


def _model_view(t) -> str:
    """The model-view column: the canonical name when it differs, or why the tensor is not used."""
    if t.get("canonical_name") is None:
        return t.get("note") or "(not recognised)"
    view = t["canonical_name"] if t["canonical_name"] != t["name"] else "="
    if t.get("canonical_shape") not in (None, t["shape"]):
        view += " [" + ", ".join(map(str, t["canonical_shape"])) + "]"
    return view


def _tensor_table(tensors) -> str:
    if not tensors:
        return "(no tensors)"
    with_stats = "stats" in tensors[0]
    with_file = any(t.get("file") for t in tensors)
    with_view = any(t.get("canonical_name") != t["name"] or t.get("note") for t in tensors)
    head = ("name", "dtype", "shape") + (("ggml shape",) if "ggml_shape" in tensors[0] else ())
    rows = [head + ("params", "bytes", "offset") + (_STAT_COLUMNS if with_stats else ())]
    for t in tensors:
        text = (t["name"] if not with_file else f"{os.path.basename(t['file'])}:{t['name']}", t["dtype"],
                "[" + ", ".join(map(str, t["shape"])) + "]")
        if "ggml_shape" in t:
            text += ("[" + ", ".join(map(str, t["ggml_shape"])) + "]",)
        rows.append(text + (f"{t['n_params']:,}", f"{t['nbytes']:,}", "-" if t.get("offset") is None else
                            f"{t['offset']:,}") + (_stat_cells(t["stats"]) if with_stats else ()))
    n_left = len(head)
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    out = []
    for i, r in enumerate(rows):
        cells = [f"{c:<{w}}" for c, w in zip(r[:n_left], widths)]
        cells += [f"{c:>{w}}" for c, w in zip(r[n_left:], widths[n_left:])]  # numbers right-aligned
        if with_view:
            cells.append("model view" if i == 0 else _model_view(tensors[i - 1]))
        out.append("  ".join(cells).rstrip())
    return "\n".join(out)
