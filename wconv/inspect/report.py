"""`wconv inspect`: what a file or directory holds, without reading tensor data.

inspect_path() returns the JSON contract described in docs/inspect-json.md;
format_text() renders the same report for people.
"""
from __future__ import annotations

import json
import math
import os

from ..convert.state_dict import summarise

REPORT_VERSION = 1
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


def report_for(model) -> dict:
    """The inspect report of an already opened Model (reads no tensor data)."""
    tensors = [{"name": name, "dtype": t.dtype.name, "shape": list(t.shape), "n_params": t.n_elements,
                "nbytes": t.nbytes} for name, t in model.tensors.items()]
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
        from .stats import model_stats

        per_tensor = model_stats(model, quiet=quiet)
        for entry in report["tensors"]:
            entry["stats"] = per_tensor[entry["name"]]
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
             "tie_embeddings", "bias"),
}


def format_text(report: dict) -> str:
    lines = [f"path:    {report.get('path', '')}",
             f"format:  {report.get('format', '')}",
             f"layout:  {report.get('layout', '')}",
             f"arch:    {report.get('arch', '')}"
             + (f" ({report['arch_source']})" if report.get("arch_source") else "")]
    cfg = report.get("config") or {}
    fields = _CONFIG_FIELDS.get(report.get("arch"))
    if fields:
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


def _tensor_table(tensors) -> str:
    if not tensors:
        return "(no tensors)"
    with_stats = "stats" in tensors[0]
    rows = [("name", "dtype", "shape", "params", "bytes") + (_STAT_COLUMNS if with_stats else ())]
    for t in tensors:
        rows.append((t["name"], t["dtype"], "[" + ", ".join(map(str, t["shape"])) + "]",
                     f"{t['n_params']:,}", f"{t['nbytes']:,}") + (_stat_cells(t["stats"]) if with_stats else ()))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    out = []
    for r in rows:
        cells = [f"{r[0]:<{widths[0]}}", f"{r[1]:<{widths[1]}}", f"{r[2]:<{widths[2]}}"]
        cells += [f"{c:>{w}}" for c, w in zip(r[3:], widths[3:])]  # numbers right-aligned
        out.append("  ".join(cells).rstrip())
    return "\n".join(out)
